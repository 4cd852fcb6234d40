"""The student runs of docs/results/README.md, fifth session: train one SFT student, score it.

Each run trains a tiny-preset student with SFT only (option answers, read by likelihood) on a data
set made by `rgpt4d data make` (the demo's: `--num-videos 1000 --seed 0 --frames 16 --size 64
--max-objects 6 --val-fraction 0.1 --test-fraction 0.2`), optionally on a subset of its question
templates, then scores it on the first `--limit` test questions and prints one JSON line.

The variants are the ones in the README's table. Those that did not become features are patched
in here, on top of the public API, so the package stays as it is:

    python docs/results/fifth_session_runs.py R --data runs/data --steps 2400 --limit 2779
    python docs/results/fifth_session_runs.py R --data runs/data --templates static3 --restate off --seed 1
    python docs/results/fifth_session_runs.py R --data runs/data --templates scalar6 --steps 750 --ordinal lm
    python docs/results/fifth_session_runs.py R --data runs/data --templates static3 --region-bn
    python docs/results/fifth_session_runs.py R --data runs/data --llm 128x4 --steps 1200
    python docs/results/fifth_session_runs.py R --data runs/data --init runs/fifth/S/model --steps 300
    python docs/results/fifth_session_runs.py R --data runs/data --templates VG.distance --steps 250 --limit 184 --answer-format rank

    python docs/results/fifth_session_runs.py R --data runs/data --templates VG.distance --steps 250 --limit 184 --answer-format rank --p4d both --cache runs/demo/teacher_cache
    python docs/results/fifth_session_runs.py R --data runs/data --templates VG.distance,DM.height --steps 1000 --limit 376 --answer-format rank --train-vision

The last three lines are the sixth and seventh sessions' (README's tables: `--answer-format
rank|option`, `--templates` also taking template names; `--p4d` with the demo's teacher cache,
`--train-vision`).

One thread per run (`torch.set_num_threads(1)`); runs go to `--out`/NAME.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from pathlib import Path

import torch

TEMPLATE_SETS = {
    "static3": ("VG.position_start", "DM.height", "SR.relation"),
    "scalar6": ("DM.height", "DM.width", "VG.distance", "SR.distance", "DP.displacement", "DP.path_length"),
}
TEMPLATE_SETS["static3+scalar6"] = tuple(dict.fromkeys(TEMPLATE_SETS["static3"] + TEMPLATE_SETS["scalar6"]))


def subset(data: Path, templates: tuple[str, ...]) -> Path:
    """A data folder with only `templates`' questions (the videos are linked, not copied)."""
    out = Path(tempfile.mkdtemp(prefix="rgpt4d-subset-"))
    for f in data.iterdir():
        if f.name not in ("train.json", "val.json", "test.json"):
            os.symlink(f.resolve(), out / f.name)
    for split in ("train", "val", "test"):
        qs = [q for q in json.loads((data / f"{split}.json").read_text()) if q["template"] in templates]
        (out / f"{split}.json").write_text(json.dumps(qs))
    return out


def patch_question_again() -> None:
    """The question repeated after the options (before the regions' line)."""
    import rgpt4d.models.tokenizer as T

    restate = T.restate_regions

    def with_question(prompt: str) -> str:
        return restate(prompt + "\nQuestion again: " + prompt.split("\n")[1])  # preamble, question, ...

    T.restate_regions = with_question


def patch_region_bn() -> None:
    """Region tokens batch-normalised over the batch's valid regions, plus a learned marker vector."""
    from rgpt4d.models import student as S

    init, forward = S.RegionTokenEncoder.__init__, S.RegionTokenEncoder.forward

    def new_init(self, dim, hidden, out_dim, *args, **kw):
        init(self, dim, hidden, out_dim, *args, **kw)
        self.tok_bn = torch.nn.BatchNorm1d(out_dim, affine=False)
        self.marker = torch.nn.Parameter(torch.randn(out_dim))

    def new_forward(self, features, boxes, valid, timestamps):
        t = forward(self, features, boxes, valid, timestamps)
        v = valid.bool()
        out = torch.zeros_like(t)
        if v.any():
            out = out.index_put((v,), self.tok_bn(t[v]))
        return out + self.marker

    S.RegionTokenEncoder.__init__, S.RegionTokenEncoder.forward = new_init, new_forward


def patch_llm(width: int, layers: int) -> None:
    from rgpt4d.models import configs as C

    get = C.get_preset

    def preset(name):
        p = get(name)
        if name == "tiny":
            p.student["text_config"] = C._qwen2(width, layers, max(4, width // 32), 2, 2 * width)
        return p

    C.get_preset = preset


def patch_model(ordinal: str | None, init: str | None) -> None:
    """After the student is built: the ordinal digit code (LM head rows, and embeddings with
    "lm+emb": row(d) += 2 |row| (z q0 - z^2 q1), z = (d - 4.5) / 4.5, q orthonormal), and/or the
    weights of a saved student (a curriculum's second stage)."""
    import rgpt4d.train.student as TS
    from safetensors.torch import load_file

    build = TS.build_training_model

    def new_build(config, tokenizer, *args, **kw):
        model = build(config, tokenizer, *args, **kw)
        st = model.inference_model()
        if ordinal:
            ids = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
            g = torch.Generator().manual_seed(1)
            weights = [st.language_model.lm_head.weight]
            if ordinal == "lm+emb":
                weights.append(st.get_input_embeddings().weight)
            for W in weights:
                q, _ = torch.linalg.qr(torch.randn(W.shape[1], 2, generator=g))
                scale = W.norm(dim=1).mean()
                with torch.no_grad():
                    for d, i in enumerate(ids):
                        z = (d - 4.5) / 4.5
                        W[i] += 2 * scale * (z * q[:, 0] - z * z * q[:, 1])
        if init:
            state = {}
            for f in sorted(Path(init).glob("*.safetensors")):
                state.update(load_file(f))
            st.load_state_dict(state)
        return model

    TS.build_training_model = new_build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default="runs/fifth")
    ap.add_argument("--templates", default=None,
                    help="train and test on these only: " + ", ".join(sorted(TEMPLATE_SETS)) +
                         ", or comma-separated template names (e.g. VG.distance)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=800, help="first N test questions")
    ap.add_argument("--questions-per-sequence", type=int, default=1)
    ap.add_argument("--restate", choices=("on", "off"), default="on")
    ap.add_argument("--question-again", action="store_true")
    ap.add_argument("--region-bn", action="store_true")
    ap.add_argument("--regions-after-marker", action="store_true",
                    help="the restated regions right after <|assistant|> (seventh session: restate_position='answer')")
    ap.add_argument("--llm", default=None, help="WIDTHxLAYERS of the tiny student's Qwen2 (default 128x2)")
    ap.add_argument("--ordinal", choices=("lm", "lm+emb"), default=None)
    ap.add_argument("--init", default=None, help="a saved student (save_pretrained folder) to start from")
    ap.add_argument("--answer-format", choices=("option", "rank"), default="option",
                    help="rank (sixth session): all-number options answered by their rank among the options")
    ap.add_argument("--p4d", choices=("none", "latent", "explicit", "both"), default="none",
                    help="distillation terms (seventh session); not none needs --cache")
    ap.add_argument("--train-vision", action="store_true",
                    help="train the vision tower too (seventh session; the presets freeze it)")
    ap.add_argument("--cache", default=None, help="the teacher cache of --data (e.g. runs/demo/teacher_cache)")
    a = ap.parse_args()
    torch.set_num_threads(1)

    from rgpt4d.models import configs as C

    C._FROM_SCRATCH["restate_regions"] = a.restate == "on"
    if a.train_vision:
        C._FROM_SCRATCH["freeze_vision"] = False
    if a.question_again:
        patch_question_again()
    if a.region_bn:
        patch_region_bn()
    # explicit either way: the presets' default became "answer" in the seventh session, and the
    # earlier rows of the README were run with the line
    C._FROM_SCRATCH["restate_position"] = "answer" if a.regions_after_marker else "line"
    if a.llm:
        patch_llm(*map(int, a.llm.split("x")))
    if a.ordinal or a.init:
        patch_model(a.ordinal, a.init)

    from rgpt4d.train import evaluate_student, train_config, train_student

    data = Path(a.data)
    if a.templates:
        data = subset(data, TEMPLATE_SETS.get(a.templates) or tuple(a.templates.split(",")))
    cfg = train_config("tiny", p4d=a.p4d, answer_format=a.answer_format, lr=a.lr, steps=a.steps,
                       batch_size=a.batch_size, warmup=0.05, questions_per_sequence=a.questions_per_sequence,
                       seed=a.seed)
    t0 = time.time()
    res = train_student(cfg, data, a.cache, Path(a.out) / a.name, progress=False, log=None)
    t1 = time.time()
    rep = evaluate_student(res["model_path"], data, "test", limit=a.limit, batch_size=16)
    print(json.dumps({"name": a.name, **{k: v for k, v in vars(a).items() if k != "name"},
                      "train_s": round(t1 - t0), "eval_s": round(time.time() - t1),
                      "loss_sft": res["loss_sft"],
                      **{k: (round(v, 1) if v is not None else None) for k, v in rep["scores"].items()}}))


if __name__ == "__main__":
    main()
