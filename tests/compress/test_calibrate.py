import pytest
import torch
from torch import nn

from llmlab.compress.calibrate import InputStats, calibrate_layers, calibration_data, layers_prefix, linears_of, observe
from llmlab.errors import LlmlabError
from llmlab.models import decoder_layers, load_model
from llmlab.models.surgery import set_module

TEXT = "Calibration text: the scaffold feeds each decoder layer the outputs of the one before. " * 40


def _out(o):
    return o[0] if isinstance(o, tuple) else o


def own_layer_io(model, calib, batch_size):
    """Each decoder layer's input and output hidden states in the model's own forward pass."""
    seen = {}
    hooks = [layer.register_forward_hook(lambda m, args, kwargs, out, i=i: seen.setdefault(i, []).append(
        ((args[0] if args else kwargs["hidden_states"]), _out(out))), with_kwargs=True)
        for i, layer in enumerate(decoder_layers(model))]
    with torch.no_grad():
        for batch in calib.split(batch_size):
            model(input_ids=batch, use_cache=False)
    for h in hooks:
        h.remove()
    return seen


def scaffold_layer_io(model, calib, batch_size, edit=None):
    """The same, as the scaffold replays it layer by layer; `edit(index, layer)` runs inside solve."""
    seen = {}

    def solve(index, layer, run):
        hook = layer.register_forward_hook(lambda m, args, out: seen.setdefault(index, []).append((args[0], _out(out))))
        run()
        hook.remove()
        if edit:
            edit(index, layer)

    calibrate_layers(model, calib, solve, batch_size=batch_size, progress=False)
    return seen


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2", "tiny-opt", "tiny-qwen2", "tiny-gpt-neox"])
def test_scaffold_replays_the_models_own_hidden_states(spec):
    model, tok = load_model(spec)
    calib = calibration_data(tok, TEXT, n_samples=5, seq_len=48)
    own, replayed = own_layer_io(model, calib, 2), scaffold_layer_io(model, calib, 2)  # batches of 2, 2, 1
    assert sorted(own) == sorted(replayed) == list(range(model.config.num_hidden_layers))
    for i in own:
        assert len(own[i]) == len(replayed[i]) == 3
        for (x, y), (x2, y2) in zip(own[i], replayed[i]):
            assert torch.allclose(x, x2, atol=1e-5) and torch.allclose(y, y2, atol=1e-5)


def test_next_layer_sees_the_compressed_layer_outputs(tiny_llama):
    from copy import deepcopy

    model, tok = deepcopy(tiny_llama[0]), tiny_llama[1]
    calib = calibration_data(tok, TEXT, n_samples=4, seq_len=32)

    def halve_o_proj(index, layer):  # stands in for quantization: it changes the layer's function
        layer.self_attn.o_proj.weight.data *= 0.5

    replayed = scaffold_layer_io(model, calib, 4, edit=halve_o_proj)
    own = own_layer_io(model, calib, 4)  # the model now has both layers edited
    assert torch.allclose(replayed[1][0][0], own[1][0][0], atol=1e-5)  # layer 1's input: edited layer 0's output
    assert not torch.allclose(replayed[0][0][1], own[0][0][1], atol=1e-3)  # layer 0 was solved before its edit


def test_activations_kept_in_the_model_dtype():
    model, tok = load_model("tiny-llama", dtype="bf16")
    calib = calibration_data(tok, TEXT, n_samples=2, seq_len=16)
    dtypes = set()

    def solve(index, layer, run):
        hook = layer.register_forward_pre_hook(lambda m, args: dtypes.add(args[0].dtype))
        run()
        hook.remove()

    calibrate_layers(model, calib, solve, progress=False)
    assert dtypes == {torch.bfloat16}


def test_calibration_windows():
    _, tok = load_model("tiny-llama")
    text = " ".join(str(i) for i in range(1000))  # no stretch of it repeats
    ids = torch.tensor(tok(text, add_special_tokens=False).input_ids)
    calib = calibration_data(tok, text, n_samples=6, seq_len=100, seed=3)
    assert calib.shape == (6, 100) and calib.dtype == torch.long
    starts = []
    for row in calib:  # each window is a stretch of the tokenized text; find where
        matches = [s for s in range(len(ids) - 99) if torch.equal(ids[s:s + 100], row)]
        assert len(matches) == 1
        starts.append(matches[0])
    assert all(b - a >= 100 for a, b in zip(starts, starts[1:]))  # in order, not overlapping
    assert torch.equal(calib, calibration_data(tok, text, n_samples=6, seq_len=100, seed=3))
    assert not torch.equal(calib, calibration_data(tok, text, n_samples=6, seq_len=100, seed=4))


def test_calibration_text_from_a_file_and_bad_input(tmp_path):
    _, tok = load_model("tiny-llama")
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    n = len(tok(TEXT, add_special_tokens=False).input_ids)
    assert torch.equal(calibration_data(tok, str(path), 2, 64), calibration_data(tok, TEXT, 2, 64))
    with pytest.raises(LlmlabError, match=f"calibration text has {n:,} tokens, fewer than n_samples x seq_len = "
                                          f"128 x 512 = 65,536; give more text or lower --n-samples/--seq-len"):
        calibration_data(tok, str(path))
    with pytest.raises(LlmlabError, match="calibration file not found: nowhere/calib.txt"):
        calibration_data(tok, "nowhere/calib.txt")
    with pytest.raises(LlmlabError, match=r"\(n_samples, seq_len\) tensor"):
        calibrate_layers(load_model("tiny-llama")[0], torch.zeros(5, dtype=torch.long), lambda *a: None)


def test_observe_collects_input_statistics():
    torch.manual_seed(0)
    block = nn.ModuleDict({"q": nn.Linear(8, 4), "k": nn.Linear(8, 3), "o": nn.Linear(4, 2)})
    xs = [torch.randn(2, 5, 8), torch.randn(3, 8)]
    with observe(dict(block)) as stats:
        for x in xs:
            block["o"](block["q"](x) + block["k"](x)[..., :1])
    X = torch.cat([x.reshape(-1, 8) for x in xs]).double()  # (13, 8)
    for name in ("q", "k"):  # read the same tensor: the statistics are computed once, shared
        s = stats[name]
        assert s.n == 13 and s.xtx.dtype == torch.float64
        assert torch.allclose(s.xtx, X.T @ X, atol=1e-5)
        assert torch.allclose(s.sq_sum, (X ** 2).sum(0), atol=1e-5)
        assert torch.allclose(s.abs_sum, X.abs().sum(0), atol=1e-5)
        assert torch.allclose(s.abs_max.double(), X.abs().amax(0), atol=1e-6)
    assert stats["o"].n == 13 and stats["o"].xtx.shape == (4, 4)
    assert not block["q"]._forward_pre_hooks  # hooks removed on exit
    single = InputStats()
    single.add(xs[1], xtx=False)
    assert single.xtx is None and single.n == 3


def test_linears_of_and_set_module():
    model, tok = load_model("tiny-gpt2")
    ids = torch.tensor([tok("hello world").input_ids])
    with torch.no_grad():
        before = model(ids).logits
    layer = decoder_layers(model)[0]
    linears = linears_of(layer)  # GPT-2's Conv1D become equivalent nn.Linear
    assert set(linears) == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    assert linears["mlp.c_fc"].weight.shape == (256, 64)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, before, atol=1e-5)
    set_module(layer, "mlp.c_proj", nn.Identity())
    assert isinstance(layer.mlp.c_proj, nn.Identity)
    assert layers_prefix(model) == "transformer.h"
    assert layers_prefix(load_model("tiny-llama")[0]) == "model.layers"
