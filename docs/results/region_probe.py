"""Linear probe of a student's region tokens (docs/results/README.md, "The regions after <|assistant|>").

How much of a scalar answer does the LLM's input already hold? For one template, take the region
token each question refers to (the region encoder's output, i.e. what the LLM receives at
`<obj_N>`), fit a ridge regression of log(answer value) on the first N training questions'
tokens (features standardised; the best of four ridge strengths) and print its R^2 on all the
template's test questions, and the accuracy of answering each test question with the option
nearest (in log value) to the probe's prediction (chance 25 %).

    PYTHONPATH=. python docs/results/region_probe.py runs/vgd_250_rank/model runs/data VG.distance 400
"""

from __future__ import annotations

import re
import sys

import torch

from rgpt4d.data import Synth4DQuestions
from rgpt4d.infer import RGPT4D, _ordered_regions


def region_tokens(wrapper: RGPT4D, data: str, split: str, template: str, limit: int):
    """[n, D] float64 tokens of the referenced region, [n] log answer values, [n, K] log option
    values and [n] answer indices."""
    model = wrapper.model
    captured = []
    hook = model.region_encoder.register_forward_hook(lambda mod, inp, out: captured.append(out.detach()))
    try:
        ds = Synth4DQuestions(data, split)
        idx = [i for i, e in enumerate(ds.entries) if e["template"] == template][:limit]
        X, y, opts, ans = [], [], [], []
        for s in range(0, len(idx), 16):
            qs = [ds[i] for i in idx[s:s + 16]]
            items = [dict(video=q["frames"], timestamps=q["timestamps"], regions=_ordered_regions(q),
                          prompt=q["prompt"], options=q["options"], som_image=q["som_image"], id=q["id"])
                     for q in qs]
            inputs = wrapper._prepare(items)
            captured.clear()
            with torch.no_grad():
                model.build_inputs_embeds(inputs["input_ids"], inputs["frames"], inputs["timestamps"],
                                          inputs["boxes"], inputs["region_mask"])
            tokens = captured[0]  # [B, R, D]: region i is <obj_{i+1}>
            for b, q in enumerate(qs):
                n = int(re.search(r"<obj_(\d+)>", q["question"]).group(1))
                X.append(tokens[b, n - 1].double())
                values = [float(o.split()[0]) for o in q["options"]]
                y.append(values[q["answer_index"]])
                opts.append(values)
                ans.append(q["answer_index"])
    finally:
        hook.remove()
    return (torch.stack(X), torch.tensor(y, dtype=torch.float64).log(), torch.tensor(opts, dtype=torch.float64).log(),
            torch.tensor(ans))


def ridge_probe(Xtr, ytr, Xte, yte, opts, ans, strengths=(1.0, 10.0, 100.0, 1000.0)) -> tuple[float, float]:
    """(R^2, nearest-option accuracy in percent) on the test set, at the strength with the best R^2."""
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-8
    A, At = (Xtr - mu) / sd, (Xte - mu) / sd
    best = (float("-inf"), 0.0)
    for lam in strengths:
        w = torch.linalg.solve(A.T @ A + lam * torch.eye(A.shape[1], dtype=A.dtype), A.T @ (ytr - ytr.mean()))
        pred = At @ w + ytr.mean()
        r2 = float(1 - ((pred - yte) ** 2).sum() / ((yte - yte.mean()) ** 2).sum())
        acc = 100.0 * float(((opts - pred[:, None]).abs().argmin(1) == ans).double().mean())
        best = max(best, (r2, acc))
    return best


def main() -> None:
    model_path, data, template = sys.argv[1], sys.argv[2], sys.argv[3]
    ntrain = int(sys.argv[4]) if len(sys.argv) > 4 else 400
    torch.set_num_threads(1)
    wrapper = RGPT4D.from_pretrained(model_path, device="cpu")
    Xtr, ytr, _, _ = region_tokens(wrapper, data, "train", template, ntrain)
    Xte, yte, opts, ans = region_tokens(wrapper, data, "test", template, 10**9)
    r2, acc = ridge_probe(Xtr, ytr, Xte, yte, opts, ans)
    print(f"{model_path} {template} train {len(ytr)} test {len(yte)} R2 {r2:.3f} nearest-option accuracy {acc:.1f} %")


if __name__ == "__main__":
    main()
