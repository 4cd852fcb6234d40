"""P4D: decoder kinds, gradients (never to the teacher), inference model without teacher/D_4DP."""

import pytest
import torch

from rgpt4d.models.configs import P4DConfig
from rgpt4d.models.p4d import P4DDecoder, RGPT4DForP4DTraining, resample_to_teacher_grid
from rgpt4d.models.teacher import Teacher4D
from tests.models.conftest import T, make_batch, make_student, teacher_config


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return Teacher4D(teacher_config()).freeze()


def teacher_targets(teacher, frames):
    with torch.no_grad():
        o = teacher(frames)
    return {"latent": o.latent, "layers": torch.stack(o.layers, 1), "depth": o.depth, "flow": o.flow,
            "motion": o.motion}


def test_resample_to_teacher_grid():
    x = torch.randn(2, 16, 9, 9, 5)
    y = resample_to_teacher_grid(x, (8, 16, 16), 2)
    assert y.shape == (2, 8, 16, 16, 5)
    same = resample_to_teacher_grid(x, (8, 9, 9), 2)
    assert torch.equal(same, x[:, ::2])  # stride 2 in time, no spatial change
    with pytest.raises(ValueError, match="teacher grid"):
        resample_to_teacher_grid(x[:, :6], (8, 9, 9), 2)


def test_decoder_inits():
    mlp = P4DDecoder(64, 32, P4DConfig(decoder="mlp", hidden_size=48))
    assert all(torch.count_nonzero(l.bias) == 0 for l in (mlp.fc1, mlp.fc2, mlp.fc3))
    lin = P4DDecoder(64, 32, P4DConfig(decoder="linear"))
    assert len(lin.layers) == 4 and abs(float(lin.layers[0].weight.detach().std()) - 0.1) < 0.02
    out = lin(torch.randn(3, 64))
    assert len(out) == 4 and out[0].shape == (3, 32)


@pytest.mark.parametrize("decoder,explicit", [("mlp", True), ("mlp", False), ("linear", True), ("linear", False)])
def test_gradients_reach_student_and_decoder_never_the_teacher(tokenizer, teacher, decoder, explicit):
    student = make_student(tokenizer)
    model = RGPT4DForP4DTraining(student, teacher, P4DConfig(decoder=decoder, explicit=explicit, hidden_size=32))
    batch = make_batch(tokenizer, student.config)
    out = model(**batch, teacher_targets=teacher_targets(teacher, batch["frames"]))
    assert torch.isfinite(out.loss) and out.p4d_loss > 0
    assert "latent" in out.terms and (("depth" in out.terms) == explicit)
    out.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    # the P4D term alone moves the LLM (the decoder's gradient flows back into the student)
    student.zero_grad()
    out2 = model(**batch, teacher_targets=teacher_targets(teacher, batch["frames"]))
    out2.p4d_loss.backward()
    assert student.language_model.model.layers[-1].mlp.down_proj.weight.grad.abs().sum() > 0


def test_p4d_off_equals_the_bare_student(tokenizer, teacher):
    student = make_student(tokenizer).eval()
    model = RGPT4DForP4DTraining(student, teacher, P4DConfig(hidden_size=32)).eval()
    batch = make_batch(tokenizer, student.config)
    with torch.no_grad():
        off = model(**batch, p4d=False, return_logits=True)
        bare = student(**batch)
    assert torch.equal(off.logits, bare.logits) and torch.equal(off.loss, bare.loss)


def test_saved_inference_model_has_no_teacher_or_decoder(tokenizer, teacher, tmp_path):
    from rgpt4d.infer import save_inference_model
    from rgpt4d.models.student import RGPT4DForConditionalGeneration

    student = make_student(tokenizer)
    model = RGPT4DForP4DTraining(student, teacher, P4DConfig(hidden_size=32))
    batch = make_batch(tokenizer, student.config)
    # one training step with P4D so the saved weights are not the initial ones
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch, teacher_targets=teacher_targets(teacher, batch["frames"])).loss.backward()
    opt.step()
    save_inference_model(model, tokenizer, tmp_path)
    loaded = RGPT4DForConditionalGeneration.from_pretrained(tmp_path).eval()
    bare = make_student(tokenizer)
    names = sorted(n for n, _ in loaded.named_parameters())
    assert names == sorted(n for n, _ in bare.named_parameters())
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in bare.parameters())
    assert not any(("decoder" in n or "teacher" in n or "heads" in n) for n in names)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not any(("decoder" in k or "teacher" in k) for k in keys)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch, p4d=False, return_logits=True).logits)


def test_p4d_needs_targets(tokenizer, teacher):
    student = make_student(tokenizer)
    model = RGPT4DForP4DTraining(student, teacher, P4DConfig(hidden_size=32))
    with pytest.raises(ValueError, match="teacher_targets"):
        model(**make_batch(tokenizer, student.config))
