"""P4D's camray term: the frozen camray head on D_4DP's grid against the teacher's rays."""

import pytest
import torch
import torch.nn.functional as F

from rgpt4d.models.configs import P4DConfig, TeacherConfig
from rgpt4d.models.p4d import RGPT4DForP4DTraining, resample_to_teacher_grid
from rgpt4d.models.teacher import Teacher4D
from tests.models.conftest import make_batch, make_student, teacher_config


def test_p4d_camray_term_equals_eager(tokenizer):
    """The P4D model's camray term is SmoothL1 of the frozen camray head on D_4DP's grid against the
    teacher's rays, weighted 0.1 * 0.05 in the total (the paper preset)."""
    torch.manual_seed(0)
    teacher = Teacher4D(TeacherConfig.from_dict({**teacher_config().to_dict(), "heads": ["depth", "flow", "motion", "camray"]}))
    teacher.freeze()
    student = make_student(tokenizer)
    model = RGPT4DForP4DTraining(student, teacher, P4DConfig(hidden_size=32, latent=False)).eval()
    assert model.explicit_heads == ["depth", "flow", "motion", "camray"]
    batch = make_batch(tokenizer, student.config)
    with torch.no_grad():
        o = teacher(batch["frames"])
        targets = {"latent": o.latent, "layers": torch.stack(o.layers, 1), "depth": o.depth, "flow": o.flow,
                   "motion": o.motion, "camray": o.camray}
        out = model(**batch, teacher_targets=targets)
        vis = student(**batch, output_visual_hidden=True).visual_hidden
        grid = model.decoder(resample_to_teacher_grid(vis, teacher.config.grid, teacher.config.tubelet_size))
        pred = teacher.heads["camray"](grid)
        expect = F.smooth_l1_loss(pred, o.camray)
        eager = {n: F.smooth_l1_loss(teacher.heads[n](grid).squeeze(2) if n != "flow" else teacher.heads[n](grid),
                                     getattr(o, n)) for n in ("depth", "flow")}
        eager["motion"] = F.smooth_l1_loss(torch.sigmoid(teacher.heads["motion"](grid).squeeze(2)), torch.sigmoid(o.motion))
    assert float(out.terms["camray"]) == pytest.approx(float(expect), rel=1e-4, abs=1e-7)
    total = 0.1 * (1.0 * eager["depth"] + 0.1 * eager["flow"] + 0.05 * eager["motion"] + 0.05 * expect)
    assert float(out.p4d_loss) == pytest.approx(float(total), rel=1e-4)
    # the released code's preset has no camray term: the head is left out
    code = RGPT4DForP4DTraining(student, teacher, P4DConfig(hidden_size=32, loss_preset="code"))
    assert code.explicit_heads == ["depth", "flow", "motion"]
