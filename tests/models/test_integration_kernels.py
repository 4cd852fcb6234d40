"""apply_kernels / remove_kernels on a small model of every supported MLLM family (rgpt4d.integrations.tiny):
the patched model's logits, loss and every parameter gradient against the unpatched model's (a deep copy,
same weights), the rgpt4d ops actually on the path, exact removal, and the refusal of unsupported models."""

import copy

import pytest
import torch

from rgpt4d.integrations.kernels import apply_kernels, kernels_applied, remove_kernels
from rgpt4d.ops import registry, set_backend
from tests.models.conftest import train_step as step
from rgpt4d.integrations.tiny import FAMILIES, available, build

pytest.importorskip("transformers", reason="the integration patches transformers models")


def family_params():
    return [pytest.param(f, marks=pytest.mark.skipif(not available(f), reason=f"this transformers has no {f} model"))
            for f in FAMILIES]


def double(inputs):
    return {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}


def assert_grads_as_close_as_fp32(patched, unpatched, exact):
    """Every parameter has a gradient in both or neither; each patched gradient is as close to the
    float64 model's as the unpatched fp32 model's own gradient is, within 4x (plus a floor of 1e-7 of the
    largest gradient: parameters whose true gradient is 0, e.g. attention key biases, hold only rounding)."""
    assert patched.keys() == unpatched.keys()
    floor = 1e-7 * max(g.abs().max().item() for g in exact.values())
    for name, g in patched.items():
        own = (unpatched[name].double() - exact[name]).abs().max().item()
        err = (g.double() - exact[name]).abs().max().item()
        assert err <= 4 * own + floor, f"{name}: |patched - fp64| {err:.3g} > 4 x |unpatched - fp64| {own:.3g}"


def rgpt4d_ops_run(fn) -> set:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("rgpt4d::")}


def patched_and_references(family, train):
    """apply_kernels on a copy of build(family): (counts, the unpatched fp32, the patched and the float64
    model's train_step), every model in train or eval mode."""
    ref, inputs = build(family)
    pat = copy.deepcopy(ref)
    exact = copy.deepcopy(ref).double()
    apply_kernels(pat)
    for m in (ref, pat, exact):
        m.train(train)
    return kernels_applied(pat), step(ref, inputs), step(pat, inputs), step(exact, double(inputs))


@pytest.mark.parametrize("family", family_params())
def test_training_step_matches_the_unpatched_model(family):
    counts, (loss_ref, logits_ref, g_ref), (loss_pat, logits_pat, g_pat), (_, _, g_64) = \
        patched_and_references(family, train=True)
    # 2 decoder layers: 2 norms each and the final one (+ Qwen3's per-head q/k norms)
    assert counts["swiglu"] == counts["rope"] == 2 and counts["rms_norm"] in (5, 9) and counts["lm_head"] == 1
    assert logits_ref is not None and logits_pat is None  # the fused path never builds the [B, L, V] logits
    torch.testing.assert_close(loss_pat, loss_ref)
    assert_grads_as_close_as_fp32(g_pat, g_ref, g_64)


@pytest.mark.parametrize("family", family_params())
def test_eval_logits_loss_and_gradients_match(family):
    # in eval mode the LM head runs and returns logits; the loss is transformers' own
    _, (loss_ref, logits_ref, g_ref), (loss_pat, logits_pat, g_pat), (_, _, g_64) = \
        patched_and_references(family, train=False)
    torch.testing.assert_close(logits_pat, logits_ref)
    torch.testing.assert_close(loss_pat, loss_ref)
    assert_grads_as_close_as_fp32(g_pat, g_ref, g_64)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_the_rgpt4d_ops_are_on_the_path(family):
    if not registry.extension_loaded():
        pytest.skip(f"the compiled rgpt4d ops are not built here ({registry.unavailable_reasons().get('cpu')}): "
                    f"on the eager backend no rgpt4d:: op appears in a profile")
    ref, inputs = build(family)
    pat = copy.deepcopy(ref)
    apply_kernels(pat)
    set_backend("cpu")
    try:
        ran = rgpt4d_ops_run(lambda: pat(**inputs).loss.backward())
        assert {"rgpt4d::rms_norm", "rgpt4d::swiglu", "rgpt4d::rope", "rgpt4d::linear_cross_entropy"} <= ran, ran
        assert {"rgpt4d::rms_norm_backward", "rgpt4d::swiglu_backward", "rgpt4d::rope_backward"} <= ran, ran
        assert not rgpt4d_ops_run(lambda: ref(**inputs).loss.backward())
    finally:
        set_backend(None)


@pytest.mark.parametrize("family", family_params())
def test_on_the_eager_backend_the_patch_is_exact(family):
    """The ops' eager references are transformers' own code: with them the patched model is bit for bit
    the unpatched one (the plumbing: label shift, head weight, loss reduction, rotary arguments)."""
    ref, inputs = build(family)
    pat = copy.deepcopy(ref)
    apply_kernels(pat)
    set_backend("eager")
    try:
        for train in (True, False):
            ref.train(train)
            pat.train(train)
            loss_ref, logits_ref, g_ref = step(ref, inputs)
            loss_pat, logits_pat, g_pat = step(pat, inputs)
            assert torch.equal(loss_pat, loss_ref)
            assert (logits_pat is None) if train else torch.equal(logits_pat, logits_ref)
            assert g_pat.keys() == g_ref.keys() and all(torch.equal(g_pat[n], g_ref[n]) for n in g_ref)
    finally:
        set_backend(None)


@pytest.mark.parametrize("family", family_params())
def test_remove_kernels_restores_the_model_exactly(family):
    model, inputs = build(family)
    classes = {n: type(m) for n, m in model.named_modules()}
    keys = list(model.state_dict())
    before = step(model, inputs)
    model.eval()
    with torch.no_grad():
        logits = model(**inputs).logits
    apply_kernels(model)
    assert list(model.state_dict()) == keys  # parameters and names unchanged
    assert all(isinstance(m, classes[n]) for n, m in model.named_modules())
    assert sum(type(m) is not classes[n] for n, m in model.named_modules()) == sum(kernels_applied(model).values())
    remove_kernels(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert not model._forward_pre_hooks and not model._forward_hooks
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, logits)
    model.train()
    after = step(model, inputs)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert all(torch.equal(after[2][n], before[2][n]) for n in before[2])


def test_apply_is_idempotent_and_remove_of_an_unpatched_model_does_nothing():
    model, inputs = build("llava")
    remove_kernels(model)
    apply_kernels(model)
    counts = kernels_applied(model)
    apply_kernels(model)
    assert kernels_applied(model) == counts
    assert len(model._forward_pre_hooks) == 1 and len(model._forward_hooks) == 1
    remove_kernels(model)
    assert kernels_applied(model) == {}


def test_num_items_in_batch_and_shift_labels_as_transformers():
    ref, inputs = build("qwen2_vl")
    pat = copy.deepcopy(ref)
    apply_kernels(pat)
    n = torch.tensor(17)  # a gradient-accumulation step's token count: the loss is the sum over it
    torch.testing.assert_close(step(pat, inputs, num_items_in_batch=n)[0], step(ref, inputs, num_items_in_batch=n)[0])
    labels = inputs["labels"]
    shift = torch.roll(labels, -2, 1)  # labels already aligned with the positions (e.g. sequence parallel)
    plain = {k: v for k, v in inputs.items() if k != "labels"}
    a = step(ref, plain, labels=labels, shift_labels=shift)
    b = step(pat, plain, labels=labels, shift_labels=shift)
    torch.testing.assert_close(b[0], a[0])
    assert b[1] is None


def test_a_forward_that_raises_leaves_the_lm_head_as_it_was():
    model, inputs = build("llava")
    apply_kernels(model)
    bad = dict(inputs, pixel_values=inputs["pixel_values"][:1])  # fewer images than placeholders
    with pytest.raises(Exception):
        model(**bad)
    model.eval()
    with torch.no_grad():
        out = model(**{k: v for k, v in inputs.items() if k != "labels"})
    assert out.logits.shape[-1] == model.config.text_config.vocab_size


def test_generate_gives_the_unpatched_tokens():
    ref, inputs = build("qwen2_vl")  # M-RoPE positions continue from the prompt's rope deltas
    pat = copy.deepcopy(ref)
    apply_kernels(pat)
    gen = {k: v for k, v in inputs.items() if k != "labels"}
    a = ref.eval().generate(**gen, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    b = pat.eval().generate(**gen, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("tied", [False, True])
def test_a_plain_causal_lm_is_patched_too(tied):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    ref = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=64,
                                       tie_word_embeddings=tied)).train()
    assert (ref.lm_head.weight is ref.model.embed_tokens.weight) == tied  # tied: one gradient from both uses
    pat = copy.deepcopy(ref)
    apply_kernels(pat)
    ids = torch.randint(0, 64, (2, 9))
    a, b = step(ref, dict(input_ids=ids, labels=ids)), step(pat, dict(input_ids=ids, labels=ids))
    torch.testing.assert_close(b[0], a[0])
    for n in a[2]:
        torch.testing.assert_close(b[2][n], a[2][n], atol=1e-6, rtol=1e-4)


def test_unsupported_models_are_refused_with_what_they_lack():
    from transformers import GemmaConfig, GemmaForCausalLM, Qwen2Config, Qwen2Model

    gemma = GemmaForCausalLM(GemmaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=8, intermediate_size=64))
    with pytest.raises(TypeError, match=r"GemmaForCausalLM is not supported: .*GemmaModel lacks an RMSNorm"):
        apply_kernels(gemma)  # Gemma's RMSNorm scales by (1 + weight): not Llama's
    assert kernels_applied(gemma) == {} and not gemma._forward_pre_hooks
    base = Qwen2Model(Qwen2Config(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=64))
    with pytest.raises(TypeError, match=r"Qwen2Model has no language model"):
        apply_kernels(base)
    with pytest.raises(TypeError, match=r"must be a torch.nn.Module"):
        apply_kernels("qwen2")

    class NoHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = base

    with pytest.raises(TypeError, match=r"NoHead has no nn.Linear `lm_head`"):
        apply_kernels(NoHead())


def test_torch_compile_of_the_patched_model():
    """torch.compile of the whole patched model (one family: compiling is minutes on this CPU): the
    same loss and gradients as the unpatched eager model."""
    ref, inputs = build("llava")
    pat = copy.deepcopy(ref)
    apply_kernels(pat)
    compiled = torch.compile(pat, dynamic=False)
    loss_ref, _, g_ref = step(ref, inputs)
    pat.zero_grad(set_to_none=True)
    out = compiled(**inputs)
    out.loss.backward()
    assert out.logits is None
    torch.testing.assert_close(out.loss.detach(), loss_ref)
    g_pat = {n: p.grad for n, p in pat.named_parameters() if p.grad is not None}
    assert g_ref.keys() <= g_pat.keys()
    # the compiled graph gives unused parameters (SigLIP's post_layernorm here) zeros instead of None
    assert all(not g_pat[n].any() for n in g_pat.keys() - g_ref.keys())
    for n in g_ref:
        torch.testing.assert_close(g_pat[n], g_ref[n], atol=1e-6, rtol=1e-4)


def test_the_benchmark_runs_and_writes_only_under_the_tests_results_folder():
    """benchmarks/bench_integrations.py --quick on one family: its table has the family's row, written
    under $RGPT4D_BENCH_OUT (tests/conftest.py: a temporary folder), nothing into the source tree."""
    import os
    from pathlib import Path

    from benchmarks import bench_integrations
    from benchmarks.harness import device_name

    tmp = Path(os.environ["RGPT4D_BENCH_OUT"])
    src = Path(bench_integrations.__file__).resolve().parent / "results"
    before = {p: p.stat().st_mtime_ns for p in src.rglob("*")}
    argv = ["--quick", "--device", "cpu", "--families", "llava", "--no-compile", "--no-plots", "--rounds", "1", "--max-seconds", "0"]
    assert bench_integrations.main(argv) == 0
    md = (tmp / device_name(torch.device("cpu")) / "integrations-quick.md").read_text()
    assert "| llava | Qwen2Model |" in md and "| train_step | full | llava |" in md
    assert {p: p.stat().st_mtime_ns for p in src.rglob("*")} == before
