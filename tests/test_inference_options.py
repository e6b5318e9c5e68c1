"""Issue 18, inference options a user can turn on: ``prepare_inference(model, dtype=..., compile=...)``,
``polymodal.load(DIR, dtype=..., compile=...)`` and ``--dtype`` / ``--compile`` on the commands that load a model.

* every registered family runs its ``example_inputs`` forward with bf16 weights (fp32 inputs cast by hooks),
  finite and close to fp32;
* a compiled tiny ViT and a compiled tiny LM give eager's outputs and never recompile across calls of one
  shape (dynamo's graph counter, and dynamo told to raise on any recompile);
* a saved tiny folder loads in bf16, and ``polymodal eval`` / ``polymodal sample`` / family commands take
  the options (a bad ``--dtype`` is a usage error naming the choices).
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import polymodal
from polymodal.cli import main
from polymodal.models.inference import CompiledForward, kept_in_fp32, parse_dtype, prepare_inference
from polymodal.registry import get_registry
from polymodal.testing import contracts

pytestmark = pytest.mark.usefixtures("one_thread")

BF16_RTOL = 0.05
"""bf16 outputs must lie within 5 % of the fp32 output's largest magnitude. bf16 keeps 8 significant bits
(a rounding error of at most 2^-9 ≈ 0.2 % per value); a tiny model rounds its input, every weight and every
activation along a path of some 10-20 operations (depth 1-2, norms, softmax), so a few ulps of the output
range (≈ 1-2 %, the largest seen is 2 % for DDPM's UNet) are expected. 5 % is about a dozen ulps: loose
enough for bf16, far below what a wrong dtype somewhere, a garbled lookup or a skipped layer gives."""


def _families() -> list[str]:
    """One registered variant per model class (every family, each once)."""
    seen: dict[type, str] = {}
    for e in get_registry().entries("model"):
        seen.setdefault(e.obj.model_class, e.name)
    return sorted(seen.values())


def _floats(out, path: str = "output"):
    """``(path, tensor)`` of every floating tensor in a model output (tensor, tuple, list or dict)."""
    if isinstance(out, torch.Tensor):
        if out.is_floating_point():
            yield path, out
    elif isinstance(out, dict):
        for k, v in out.items():
            yield from _floats(v, f"{path}.{k}")
    elif isinstance(out, (list, tuple)):
        for i, v in enumerate(out):
            yield from _floats(v, f"{path}[{i}]")


# -- parse_dtype ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("fp32", torch.float32),
        ("float32", torch.float32),
        ("bf16", torch.bfloat16),
        ("BFloat16", torch.bfloat16),
        ("fp16", torch.float16),
        ("float16", torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (None, None),
    ],
)
def test_parse_dtype_accepts_the_names_and_torch_dtypes(given, expected):
    assert parse_dtype(given) is expected


@pytest.mark.parametrize("bad", ["bf17", "int8", "", torch.int64, torch.float64, 16])
def test_parse_dtype_names_the_choices(bad):
    with pytest.raises(ValueError, match=r"dtype must be one of fp32, float32, bf16.*got"):
        parse_dtype(bad)


def test_prepare_inference_refuses_a_non_bool_compile():
    with pytest.raises(ValueError, match="compile must be True or False; got 'yes'"):
        prepare_inference(nn.Linear(2, 2), compile="yes")


# -- dtype -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", _families())
def test_every_family_runs_in_bf16_close_to_fp32(name):
    model = contracts.build(name).eval()
    inputs = contracts.example_inputs(model, 2)  # the callers' float32 inputs, unchanged below
    with torch.no_grad():
        reference = dict(_floats(model(*inputs)))
        assert model is prepare_inference(model, dtype="bf16")
        seen: set[torch.dtype] = set()  # the dtypes the model's layers computed in
        hooks = [
            m.register_forward_hook(lambda m, a, o: seen.update(t.dtype for _, t in _floats(o)))
            for m in model.modules()
        ]
        out = dict(_floats(model(*inputs)))
        for hook in hooks:
            hook.remove()
    assert model.inference_dtype == torch.bfloat16 and not model.training
    _, parts = kept_in_fp32(model)  # a VQ tokenizer part stays fp32 whole; everything else is cast
    for key, p in model.named_parameters():
        assert p.dtype == (torch.float32 if key.split(".")[0] in parts else torch.bfloat16), (name, key, p.dtype)
    assert out.keys() == reference.keys() and reference, f"{name}: no floating outputs to compare"
    assert torch.bfloat16 in seen, f"{name}: no layer computed in bf16"
    for key, ref in reference.items():
        got = out[key]
        assert got.dtype in (torch.bfloat16, torch.float32) and got.shape == ref.shape, (name, key, got.dtype)
        assert torch.isfinite(got).all(), f"{name} {key}: non-finite bf16 output"
        bound = BF16_RTOL * ref.abs().max().item()
        err = (got.float() - ref).abs().max().item()
        assert err <= bound, f"{name} {key}: bf16 differs from fp32 by {err:.4g} > {bound:.4g}"


def test_fp16_runs_a_vit():
    model = contracts.build("vit").eval()
    (x,) = contracts.example_inputs(model, 2)
    with torch.no_grad():
        reference = model(x)  # (B, classes)
        out = prepare_inference(model, dtype=torch.float16)(x)
    assert out.dtype == torch.float16 and model.inference_dtype == torch.float16
    assert (out.float() - reference).abs().max() <= BF16_RTOL * reference.abs().max()  # fp16 is finer than bf16


@pytest.mark.parametrize(("name", "kept"), [("vqvae", "codebook.embed"), ("igpt", "palette")])
def test_buffers_that_carry_the_function_stay_fp32(name, kept):
    model = prepare_inference(contracts.build(name), dtype="bf16")
    buffers = dict(model.named_buffers())
    assert buffers[kept].dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize("name", ["dalle", "rudolph"])
def test_a_vq_tokenizer_part_stays_fp32_and_gives_the_same_codes(name):
    model = contracts.build(name).eval()
    spec = model.vq.image_spec()
    images = torch.rand(2, spec.channels, spec.size, spec.size, generator=torch.Generator().manual_seed(0))
    codes = model.vq.encode(images)  # (B, h, w)
    prepare_inference(model, dtype="bf16")
    assert kept_in_fp32(model)[1] == {"vq"}
    assert all(p.dtype == torch.float32 for p in model.vq.parameters())
    assert model.head.weight.dtype == torch.bfloat16
    assert torch.equal(model.vq.encode(images), codes)


def test_a_vqvae_encodes_in_bf16_to_the_fp32_codes():
    model = contracts.build("vqvae").eval()
    spec = model.image_spec()
    images = torch.rand(2, spec.channels, spec.size, spec.size, generator=torch.Generator().manual_seed(0))
    codes = model.encode(images)  # (B, h, w)
    prepare_inference(model, dtype="bf16")
    agree = (model.encode(images) == codes).float().mean().item()
    assert agree >= 0.9, f"only {agree:.0%} of the codes survive bf16"


class _Lookup(nn.Module):
    """A model with its own fp32-only buffer (``inference_keep_fp32``) and one that may be cast."""

    inference_keep_fp32 = ("table",)

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 3)
        self.register_buffer("table", torch.linspace(0, 1, 5))
        self.register_buffer("scale", torch.ones(3))
        self.register_buffer("index", torch.arange(3))

    def forward(self, x):
        return self.proj(x) * self.scale  # (B, 3)


def test_a_model_lists_its_own_fp32_buffers_and_integer_buffers_stay():
    model = prepare_inference(_Lookup(), dtype="bf16")
    assert model.table.dtype == torch.float32 and model.scale.dtype == torch.bfloat16
    assert model.index.dtype == torch.int64 and model.proj.weight.dtype == torch.bfloat16
    assert model(torch.ones(2, 3)).dtype == torch.bfloat16  # a float32 input is cast by the hook


def test_casting_back_to_fp32_removes_the_hooks():
    model = prepare_inference(_Lookup(), dtype="bf16")
    prepare_inference(model, dtype="fp32")
    assert model.inference_dtype == torch.float32 and not model.proj._forward_pre_hooks
    with pytest.raises(RuntimeError):  # no hook casts a bf16 input any more: the fp32 Linear refuses it
        model(torch.ones(2, 3, dtype=torch.bfloat16))
    prepare_inference(model, dtype="bf16")
    prepare_inference(model, dtype="bf16")
    assert len(model.proj._forward_pre_hooks) == 1  # one hook, however often it is called


def test_no_options_change_nothing():
    model = contracts.build("vit").train()
    (x,) = contracts.example_inputs(model, 2)
    keys = list(model.state_dict())
    prepare_inference(model)
    assert model.inference_dtype == torch.float32 and model.compile_inference is False and not model.training
    assert list(model.state_dict()) == keys and not model.encoder._forward_pre_hooks
    assert not isinstance(model.__dict__.get("forward"), CompiledForward)


# -- compile -----------------------------------------------------------------------------------

dynamo = pytest.importorskip("torch._dynamo")


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _compiles_once(model, inputs, calls: int = 3):
    """Compile ``model`` (prepare_inference), call it ``calls`` times on ``inputs``: the first call compiles
    one graph per compiled module, later ones none (dynamo raises on any recompile); returns eager and
    compiled outputs."""
    with torch.no_grad():
        eager = model(*inputs)
    keys = list(model.state_dict())
    dynamo.reset()
    prepare_inference(model, compile=True)
    compiled = [m for m in model.modules() if isinstance(m.__dict__.get("forward"), CompiledForward)]
    assert compiled and model.compile_inference is True and list(model.state_dict()) == keys
    before = _graphs()
    with torch.no_grad():
        first = model(*inputs)
    made = _graphs() - before
    assert 1 <= made <= len(compiled) * 2, f"{made} graphs for {len(compiled)} compiled module(s)"
    with dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for _ in range(calls - 1):
            again = model(*inputs)
    assert _graphs() - before == made, "a repeated call of the same shape compiled again"
    torch.testing.assert_close(again, first)
    return eager, first


def test_a_compiled_vit_never_recompiles_and_matches_eager():
    model = contracts.build("vit").eval()
    eager, compiled = _compiles_once(model, contracts.example_inputs(model, 2))
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)


def test_a_deep_copy_of_a_compiled_model_runs_its_own_weights():
    import copy

    model = prepare_inference(contracts.build("vit"), compile=True)
    twin = copy.deepcopy(model)
    forward = twin.encoder.blocks.__dict__["forward"]
    assert isinstance(forward, CompiledForward) and forward.eager.__self__ is twin.encoder.blocks
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    (x,) = contracts.example_inputs(model, 2)
    with torch.no_grad():
        assert not torch.allclose(twin(x), model(x))


def test_a_compiled_lm_never_recompiles_and_matches_eager():
    model = contracts.build("lm").eval()
    eager, compiled = _compiles_once(model, contracts.example_inputs(model, 2))
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)


@pytest.mark.slow  # compiles the decoder's static step too (about 15 s of CPU here)
def test_a_compiled_lm_generates_the_eager_tokens_without_recompiling():
    model = contracts.build("lm").eval()
    prompt = torch.tensor([[1, 5, 7, 9]])  # (1, 4)
    greedy = model.generate_ids(prompt, 6, greedy=True, stop_at_eos=False)  # (1, 10), eager
    dynamo.reset()
    prepare_inference(model, compile=True)
    assert torch.equal(model.generate_ids(prompt, 6, greedy=True, stop_at_eos=False), greedy)
    before = _graphs()
    with dynamo.config.patch(error_on_recompile=True):  # a second generation of the same shapes compiles nothing
        assert torch.equal(model.generate_ids(prompt, 6, greedy=True, stop_at_eos=False), greedy)
    assert _graphs() == before


# -- load and the CLI --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inference") / "vit"
    contracts.build("vit").save(folder)
    return folder


def test_load_in_bf16(vit_folder):
    model = polymodal.load(vit_folder, dtype="bf16")
    assert model.inference_dtype == torch.bfloat16 and not model.training
    (x,) = contracts.example_inputs(model, 2)
    reference = polymodal.load(vit_folder)(x)
    out = model(x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - reference).abs().max() <= BF16_RTOL * reference.abs().max()


def test_load_refuses_a_bad_dtype_naming_the_choices(vit_folder):
    with pytest.raises(ValueError, match="dtype must be one of fp32.*bf16.*fp16.*got 'bf17'"):
        polymodal.load(vit_folder, dtype="bf17")


def test_cli_eval_in_bf16(vit_folder):
    runner = CliRunner()
    fp32 = runner.invoke(main, ["eval", str(vit_folder), "--json", "--threads", "1"])
    bf16 = runner.invoke(main, ["eval", str(vit_folder), "--json", "--dtype", "bf16", "--threads", "1"])
    assert fp32.exit_code == 0 and bf16.exit_code == 0, fp32.output + bf16.output
    a, b = json.loads(fp32.output), json.loads(bf16.output)
    assert a.keys() == b.keys() and "accuracy" in b and 0.0 <= b["accuracy"] <= 1.0


@pytest.mark.parametrize("bad", ["bf17", "int8"])
def test_cli_refuses_a_bad_dtype(vit_folder, bad):
    result = CliRunner().invoke(main, ["eval", str(vit_folder), "--dtype", bad])
    assert result.exit_code == 2
    assert f"'{bad}' is not one of 'fp32', 'bf16', 'fp16'" in result.output


def _model_commands() -> list[list[str]]:
    """``eval``, ``sample`` and every registered family command that takes a model folder (a ``directory``
    argument), as its ``polymodal`` words."""
    found = [["eval"], ["sample"]]
    for e in get_registry().entries("command"):
        if any(p.name == "directory" for p in e.obj.params):
            found.append([e.plugin, e.obj.name or e.name])
    return found


COMMANDS = _model_commands()


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_that_loads_a_model_offers_the_options(command):
    assert {"clip", "dino", "flamingo", "fromage"} <= {c[0] for c in COMMANDS}  # the family commands are found
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "--dtype [fp32|bf16|fp16]" in result.output and "--compile" in result.output


def _sample(tmp_path, *options: str) -> list[str]:
    """``polymodal sample`` of a tiny LM folder with ``options``: the lines it wrote."""
    folder, out = tmp_path / "lm", tmp_path / "samples"
    if not folder.exists():
        contracts.build("lm").save(folder)
    args = ["sample", str(folder), "-n", "2", "--out", str(out), "--threads", "1", *options]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return (out / "samples.txt").read_text(encoding="utf-8").splitlines()


def test_cli_sample_in_bf16(tmp_path):
    assert len(_sample(tmp_path, "--dtype", "bf16")) >= 2


@pytest.mark.slow  # compiles the LM's decoding step (tens of seconds on a busy CPU)
def test_cli_sample_compiled_gives_the_eager_samples(tmp_path):
    assert _sample(tmp_path, "--compile") == _sample(tmp_path)  # fp32: the same tokens, compiled or not


def test_cli_classify_in_bf16(tmp_path):
    from polymodal.data import load_dataset
    from polymodal.eval.images import save_png

    folder = tmp_path / "clip"
    contracts.build("clip").save(folder)
    image = tmp_path / "digit.png"
    save_png(load_dataset("digits").test["image"][0], image)
    args = ["clip", "classify", str(folder), str(image), "--labels", "zero,one", "--dtype", "bf16"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    probs = [float(line.rsplit(":", 1)[1]) for line in result.output.splitlines()[1:]]
    assert len(probs) == 2 and abs(sum(probs) - 1) < 1e-2
