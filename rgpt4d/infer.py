"""Inference with a saved 4D-RGPT student: one question, or many in batches with a progress bar.

    from rgpt4d.infer import RGPT4D
    model = RGPT4D.from_pretrained("runs/demo/students/p4d")
    letter = model.answer(video, timestamps, regions, question, options)

`video` is frames [T, 3, H, W] (torch, uint8 or float in [0, 1]) or [T, H, W, 3] (numpy/torch uint8);
`timestamps` are the frames' times in seconds; `regions` are first-frame boxes (x0, y0, x1, y1,
pixels), the i-th box being `<obj_{i+1}>` in the question; `options` the option values. The saved
model is the bare student (no teacher, no D_4DP): `save_inference_model` writes it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from rgpt4d.data import Synth4DQuestions
from rgpt4d.data.schema import LETTERS, format_prompt, option_text
from rgpt4d.data.som import draw_som
from rgpt4d.models.loaders import load_nvila
from rgpt4d.models.pretrained import is_nvila_folder
from rgpt4d.models.student import RGPT4DForConditionalGeneration
from rgpt4d.models.tokenizer import answer_ids, encode_batch, letter_token_ids


def save_inference_model(model, tokenizer, path: str | Path, state_dict: Optional[dict] = None) -> Path:
    """Save the deployed model: the bare student of `model` (a student or an RGPT4DForP4DTraining),
    with its tokenizer, as safetensors. `state_dict`: the student's weights when its parameters are
    not whole (FSDP shards, gathered by rgpt4d.train.fsdp.student_state_dict). Returns the path."""
    student = model.inference_model() if hasattr(model, "inference_model") else model
    path = Path(path)
    student.save_pretrained(path, state_dict=state_dict)
    tokenizer.save_pretrained(path)
    return path


def _frames_tensor(video: Any) -> torch.Tensor:
    v = torch.as_tensor(np.asarray(video)) if not isinstance(video, torch.Tensor) else video
    if v.dim() != 4:
        raise ValueError(f"video: expected frames [T, 3, H, W] or [T, H, W, 3], got shape {tuple(v.shape)}")
    if v.shape[1] != 3 and v.shape[-1] == 3:
        v = v.permute(0, 3, 1, 2)
    if v.shape[1] != 3:
        raise ValueError(f"video: expected 3 colour channels, got shape {tuple(v.shape)}")
    return v.contiguous()


class RGPT4D:
    """A loaded student and its tokenizer, answering multiple-choice questions with a letter."""

    def __init__(self, model, tokenizer, device: str | torch.device = "cpu"):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.letter_ids = letter_token_ids(tokenizer, 10)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: Optional[torch.dtype] = None) -> "RGPT4D":
        """A saved student (`save_inference_model`), or an NVILA folder (llm/, vision_tower/,
        mm_projector/: NVILA-Lite-8B, the released 4D-RGPT-8B; rgpt4d.models.loaders.load_nvila).
        `dtype`: the weights' dtype (default float32; bfloat16 halves the memory on a GPU)."""
        path = Path(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model: no config.json in {path} (save one with rgpt4d.infer.save_inference_model)")
        dtype = torch.float32 if dtype is None else dtype
        if is_nvila_folder(path):
            model, tokenizer = load_nvila(path, dtype=dtype)
        else:
            model = RGPT4DForConditionalGeneration.from_pretrained(path, dtype=dtype)
            tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
        return cls(model, tokenizer, device)

    # -- one question ---------------------------------------------------------------------------
    def answer(self, video: Any, timestamps: Sequence[float], regions: Optional[Sequence[Sequence[float]]],
               question: str, options: Sequence[Any], som_image: Any = None, scoring: str = "auto") -> str:
        """The letter of the chosen option (`scoring`: see answer_batch)."""
        return self.answer_batch([dict(video=video, timestamps=timestamps, regions=regions, question=question,
                                       options=options, som_image=som_image)], progress=False, scoring=scoring)[0]

    # -- many questions -------------------------------------------------------------------------
    def _prepare(self, items: list[dict]) -> dict:
        frames, times, boxes, somi, prompts = [], [], [], [], []
        for it in items:
            frames.append(_frames_tensor(it["video"]))
            times.append(torch.as_tensor(it["timestamps"], dtype=torch.float32))
            regions = it.get("regions")
            b = torch.as_tensor(regions if regions is not None and len(regions) else np.zeros((0, 4)),
                                dtype=torch.float32)
            if b.dim() != 2 or b.shape[-1] != 4:
                raise ValueError(f"regions: expected a list of (x0, y0, x1, y1) boxes, got shape {tuple(b.shape)}")
            boxes.append(b)
            prompts.append(it["prompt"] if "prompt" in it else format_prompt(it["question"], list(it["options"])))
            if it.get("som_image") is not None:
                s = _frames_tensor(torch.as_tensor(np.asarray(it["som_image"]))[None])[0]
                somi.append(s)
            elif self.model.config.region_mode in ("som", "both"):  # drawn from the boxes, as R4D-Bench's
                somi.append(_som_from_boxes(frames[-1][0], b))
        shapes = {tuple(f.shape) for f in frames}
        if len(shapes) > 1:
            raise ValueError(f"video: all videos of a batch need one shape, got {sorted(shapes)}")
        R = max(b.shape[0] for b in boxes)
        box_t = torch.zeros(len(items), R, 4)
        mask = torch.zeros(len(items), R, dtype=torch.bool)
        for i, b in enumerate(boxes):
            box_t[i, : b.shape[0]] = b
            mask[i, : b.shape[0]] = True
        for i, t in enumerate(times):
            if t.shape[0] != frames[i].shape[0]:
                raise ValueError(f"timestamps: {t.shape[0]} timestamps for {frames[i].shape[0]} frames")
        cfg = self.model.config
        enc = encode_batch(self.tokenizer, prompts, cfg.prompt_visual(), restate=cfg.restate_mode())
        d = self.device
        inputs = dict(input_ids=enc["input_ids"].to(d), attention_mask=enc["attention_mask"].to(d),
                      frames=torch.stack(frames).to(d), timestamps=torch.stack(times).to(d),
                      boxes=box_t.to(d), region_mask=mask.to(d))
        if somi:
            inputs["som_image"] = torch.stack(somi).to(d)
        return inputs

    SCORINGS = ("auto", "letter", "likelihood")

    def default_scoring(self) -> str:
        """How this model's answers are read: its config's answer_format "letter" -> "letter" (the
        generated letter), "option" / "rank" -> "likelihood" (the option whose answer text is most
        likely)."""
        return "likelihood" if self._text_answers() else "letter"

    def _text_answers(self) -> bool:
        """Whether the model answers with a text before the letter (formats "option" and "rank")."""
        return self.model.config.answer_format in ("option", "rank")

    @torch.no_grad()
    def answer_batch(self, items: Iterable[dict], batch_size: int = 8, progress: bool = True,
                     scoring: str = "auto") -> list[str]:
        """Answer many questions (dicts with answer()'s arguments, or `prompt` instead of question
        and options) in batches; returns one letter per question, never an unparseable answer.

        scoring "letter": the model generates its answer; the letter it writes is the prediction (the
        first token for the letter format; the "(X)" after the option text for the option format). A
        reply without a valid letter falls back to the most likely valid letter of the first step
        (letter format) or to likelihood scoring (option format). "likelihood": the option whose text
        has the highest log-likelihood after the prompt (rgpt4d.models.tokenizer.answer_ids's text
        tokens) is chosen; the model never has to bind a letter to an option. "auto": the model's
        `default_scoring()`."""
        if scoring not in self.SCORINGS:
            raise ValueError(f"scoring: must be one of {self.SCORINGS}, got {scoring!r}")
        if scoring == "auto":
            scoring = self.default_scoring()
        items = list(items)
        if scoring == "likelihood" or self._text_answers():
            for i, it in enumerate(items):
                if "options" not in it or not len(it["options"]):
                    raise ValueError(f"items: question {i} has no `options`; scoring {scoring!r} with an "
                                     f"{self.model.config.answer_format!r}-format model needs the option texts")
        out: list[str] = []
        bar = None
        if progress:
            bar = tqdm(total=len(items), desc="infer", unit="q")
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            inputs = self._prepare(chunk)
            if scoring == "likelihood":
                out.extend(self._by_likelihood(chunk, inputs))
            elif self._text_answers():
                out.extend(self._option_letters(chunk, inputs))
            else:
                out.extend(self._first_letters(chunk, inputs))
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        return out

    def _num_options(self, it: dict) -> int:
        return len(it["options"]) if "options" in it else int(it.get("num_options", 5))

    def _first_letters(self, chunk: list[dict], inputs: dict) -> list[str]:
        res = self.model.generate(**inputs, max_new_tokens=1, output_scores=True, return_dict_in_generate=True)
        first = res.scores[0]
        out = []
        for i, it in enumerate(chunk):
            tok = int(res.sequences[i, -1])
            valid = self.letter_ids[:self._num_options(it)]
            out.append(LETTERS[valid.index(tok)] if tok in valid else LETTERS[int(first[i, valid].argmax())])
        return out

    def option_scores(self, chunk: list[dict], inputs: Optional[dict] = None) -> torch.Tensor:
        """[len(chunk), K] summed log-likelihood of each option's text after its prompt (-inf past a
        question's last option)."""
        inputs = self._prepare(chunk) if inputs is None else inputs
        opts = []
        for it in chunk:
            per = []
            texts = [option_text(v) for v in it["options"]]
            fmt = "rank" if self.model.config.answer_format == "rank" else "option"
            for k, v in enumerate(texts):  # the text tokens the model's format trains on
                ids, n = answer_ids(self.tokenizer, fmt, LETTERS[k], v, texts)
                per.append(ids[:n])
            opts.append(per)
        return self.model.option_log_likelihoods(options=opts, **inputs)

    def _by_likelihood(self, chunk: list[dict], inputs: dict) -> list[str]:
        return [LETTERS[int(k)] for k in self.option_scores(chunk, inputs).argmax(1)]

    def _option_letters(self, chunk: list[dict], inputs: dict) -> list[str]:
        """The letter the model writes after the option text: "... (X)</s>"."""
        longest = max(len(self.tokenizer.encode(str(v), add_special_tokens=False)) for it in chunk for v in it["options"])
        seqs = self.model.generate(**inputs, max_new_tokens=longest + 4)
        texts = self.tokenizer.batch_decode(seqs, skip_special_tokens=True)
        out, missing = [], []
        for i, (it, text) in enumerate(zip(chunk, texts)):
            found = re.findall(r"\(([A-J])\)", text)
            if found and LETTERS.index(found[-1]) < self._num_options(it):
                out.append(found[-1])
            else:
                out.append(None)
                missing.append(i)
        if missing:
            sub = {k: (v[missing] if torch.is_tensor(v) else v) for k, v in inputs.items()}
            fallback = self._by_likelihood([chunk[i] for i in missing], sub)
            for i, letter in zip(missing, fallback):
                out[i] = letter
        return out

    def answer_dataset(self, data_dir: str | Path, split: str = "test", out: Optional[str | Path] = None,
                       batch_size: int = 8, limit: Optional[int] = None, progress: bool = True,
                       scoring: str = "auto") -> list[dict]:
        """Predictions for a synthetic split: [{"id", "prediction"}], optionally written as JSONL."""
        ds = Synth4DQuestions(data_dir, split)
        n = len(ds) if limit is None else min(limit, len(ds))
        items = []
        for i in range(n):
            q = ds[i]
            items.append(dict(video=q["frames"], timestamps=q["timestamps"], regions=_ordered_regions(q),
                              prompt=q["prompt"], options=q["options"], som_image=q["som_image"], id=q["id"]))
        letters = self.answer_batch(items, batch_size=batch_size, progress=progress, scoring=scoring)
        preds = [{"id": it["id"], "prediction": letter} for it, letter in zip(items, letters)]
        if out is not None:
            Path(out).write_text("".join(json.dumps(p) + "\n" for p in preds))
        return preds


def _som_from_boxes(frame: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """The SoM image of a first frame [3, H, W] (uint8, or float in [0, 1]): box i outlined and
    tagged i + 1 (rgpt4d.data.som.draw_som). Returns uint8 [3, H, W]."""
    img = frame if frame.dtype == torch.uint8 else (frame.float().clamp(0, 1) * 255).round().to(torch.uint8)
    drawn = draw_som(img.permute(1, 2, 0).cpu().numpy(), {i + 1: tuple(b.tolist()) for i, b in enumerate(boxes)})
    return torch.from_numpy(drawn).permute(2, 0, 1).contiguous()


def _ordered_regions(q: dict) -> list:
    """Boxes in <obj_N> order (box i is <obj_{i+1}>), from a Synth4DQuestions item."""
    ids = q["region_ids"].tolist()
    boxes = q["boxes"].tolist()
    if not ids:
        return []
    out = [[0.0, 0.0, 0.0, 0.0]] * max(ids)
    for n, b in zip(ids, boxes):
        out[n - 1] = b
    return out
