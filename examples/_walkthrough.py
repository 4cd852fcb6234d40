"""The drop-in walk-through every family's example runs: a tiny model of the family, built offline
from configs (rgpt4d.integrations.tiny), patched with apply_rgpt4d, then forward and generate with
timestamps and a region box, one P4D step with frozen teacher heads, and the patch removed."""

import torch

from rgpt4d.integrations.tiny import OBJ, tiny_inputs, tiny_model
from rgpt4d.integrations.transformers import (
    apply_rgpt4d,
    attach_p4d,
    detach_p4d,
    p4d_loss,
    remove_rgpt4d,
    visual_hidden,
)


class FrozenHeads(torch.nn.Module):
    """Stand-in for a 4D teacher's frozen heads (rgpt4d's Teacher4D.predict_heads takes the same
    list of four grids): depth and flow maps from the decoded latent."""

    def __init__(self, dim: int):
        super().__init__()
        self.depth, self.flow = torch.nn.Linear(dim, 1), torch.nn.Linear(dim, 2)
        self.requires_grad_(False)

    def forward(self, grids):
        return {"depth": self.depth(grids[-1]).squeeze(-1), "flow": self.flow(grids[-1])}


def walkthrough(family: str, *, video: bool, frames: int = 4) -> None:
    torch.manual_seed(0)
    model = tiny_model(family)
    # one sample: `frames` frames (images, or one video) and their times in seconds (any frame rate),
    # then text with an <obj_1> token that the region token replaces
    inputs, timestamps = tiny_inputs(family, model, batch=1, frames=frames, video=video, obj=True)
    boxes = torch.tensor([[[2.0, 3.0, 11.0, 12.0]]])  # <obj_1> in the first frame, pixels (x0, y0, x1, y1)
    what = "video" if video else "images"
    print(f"== {type(model).__name__} ({what}), timestamps {timestamps[0].tolist()}")

    with torch.no_grad():
        before = model(**inputs).logits
    apply_rgpt4d(model, obj_token_ids=list(OBJ))
    with torch.no_grad():
        unchanged = model(**inputs).logits
        with_time = model(**inputs, timestamps=timestamps, boxes=boxes).logits
    print(f"without timestamps the patched model is unchanged: {torch.equal(before, unchanged)}")
    print(f"with timestamps and a region: max logit change {float((with_time - before).abs().max()):.4f}")
    out = model.generate(**inputs, timestamps=timestamps, boxes=boxes, max_new_tokens=4, do_sample=False,
                         pad_token_id=0)
    print("generated:", out[0, inputs["input_ids"].shape[1]:].tolist())

    # training-only P4D: D_4DP on the LM's hidden states at the visual tokens, the latent loss against
    # a (here random) teacher latent, the explicit losses through the teacher's frozen heads
    out = model(**inputs, timestamps=timestamps, output_hidden_states=True)
    B, T, h, w, _ = visual_hidden(model, out.hidden_states[-1], inputs["input_ids"]).shape
    grid, dim = (max(T // 2, 1), h, w), 16
    attach_p4d(model, teacher_dim=dim, teacher_grid=grid, tubelet=2)
    targets = {"latent": torch.randn(B, *grid, dim), "depth": torch.rand(B, *grid), "flow": torch.randn(B, *grid, 2)}
    loss = p4d_loss(model, out.hidden_states[-1], inputs["input_ids"], targets, teacher_heads=FrozenHeads(dim))
    loss.total.backward()
    terms = ", ".join(f"{k} {float(v.detach()):.4f}" for k, v in loss.terms.items())
    print(f"P4D loss {float(loss.total.detach()):.4f} ({terms}); the LM grid per frame is {h}x{w} over {T} frame(s)")

    detach_p4d(model)
    remove_rgpt4d(model)
    clean = not any("rgpt4d" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        restored = torch.equal(model(**inputs).logits, before)
    print(f"patch removed before saving: {clean and restored}")
