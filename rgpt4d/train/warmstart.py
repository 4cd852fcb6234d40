"""A warm start for the student's LLM: learn to *read multiple-choice options* before seeing video.

The paper starts from a pretrained LLM (Qwen2 in NVILA), which already maps "the answer is X" to
the letter of option X. Our tiny Qwen2 starts from random weights, and a from-scratch student has to
discover two things at once from the letter alone: the 4D quantity in the video, and which letter's
option holds it. On CPU budgets it discovers neither (measured: 1200 SFT steps of 8 questions stay
at chance, predicting one constant letter).

So, like the paper's pretrained LLM, ours first learns the reading skill, on text only: training
questions with the answer value written into the question ("... (the answer is 0.81 m)") and the
letter as the target. No video, no visual tokens: a few hundred fast steps of the LLM alone. The
student's training then starts from these LLM weights (TrainConfig.init_llm), SFT-only and P4D
students alike, and has to find the value in the video instead of in the text. Test questions are
never used (and carry no hint at evaluation).

    warm_start_llm(data_dir, "runs/llm_warmstart.safetensors", preset="tiny", steps=400)
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Callable, Optional

import torch


def hinted_prompt(question: dict) -> str:
    """The question's evaluation prompt with its answer value written into the question."""
    from rgpt4d.data.schema import format_prompt, option_text

    return format_prompt(f"{question['question']} (the answer is {option_text(question['answer'])})",
                         list(question["options"]))


def warm_start_llm(data_dir: str | Path, out: str | Path, *, preset: str = "tiny", steps: int = 400,
                   batch_size: int = 32, lr: float = 2e-3, seed: int = 0, progress: bool = True,
                   log: Optional[Callable[[str], None]] = print) -> dict:
    """Train the preset's student LLM (from the same initialisation a student gets: seed `seed`) on
    hinted train-split questions; save its state dict (safetensors) to `out`.

    Returns {"steps", "seconds", "loss" (last), "train_accuracy" (last 20 steps), "path"}."""
    from safetensors.torch import save_file

    from rgpt4d.data.schema import LETTERS, answer_index
    from rgpt4d.models.configs import get_preset, student_config
    from rgpt4d.models.student import RGPT4DForConditionalGeneration
    from rgpt4d.models.tokenizer import encode_batch, train_tokenizer

    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size: must be >= 1, got {steps} and {batch_size}")
    questions = json.loads((Path(data_dir) / "train.json").read_text())
    if not questions:
        raise ValueError(f"data_dir: {data_dir} has no train questions")
    p = get_preset(preset)
    tokenizer = train_tokenizer(vocab_size=p.tokenizer_vocab_size)
    torch.manual_seed(seed)
    llm = RGPT4DForConditionalGeneration(student_config(p, tokenizer)).language_model.train()
    opt = torch.optim.AdamW(llm.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    rng = random.Random(seed)
    order: list[int] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="LLM warm start (text only)", unit="step")
    t0, hits, loss_v = time.time(), [], float("nan")
    for step in range(steps):
        if len(order) < batch_size:
            order += rng.sample(range(len(questions)), len(questions))
        batch = [questions[order.pop()] for _ in range(batch_size)]
        letters = [LETTERS[answer_index(q["options"], q["answer"])] for q in batch]
        enc = encode_batch(tokenizer, [hinted_prompt(q) for q in batch], 0, letters)
        pos = (enc["attention_mask"].cumsum(-1) - 1).clamp_min(0)
        lm_out = llm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], position_ids=pos,
                  labels=enc["labels"])
        opt.zero_grad(set_to_none=True)
        lm_out.loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():  # the letter is the first labelled token: predicted one position before
            first = (enc["labels"] != -100).float().argmax(1)
            pred = lm_out.logits[torch.arange(len(batch)), first - 1].argmax(-1)
            hits.append(float((pred == enc["labels"][torch.arange(len(batch)), first]).float().mean()))
        loss_v = float(lm_out.loss.detach())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_v:.3f}", acc=f"{sum(hits[-20:]) / len(hits[-20:]):.2f}")
    if bar is not None:
        bar.close()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in llm.state_dict().items()}, str(out))
    res = {"steps": steps, "seconds": time.time() - t0, "loss": loss_v,
           "train_accuracy": sum(hits[-20:]) / len(hits[-20:]), "path": str(out)}
    if log is not None:
        log(f"LLM warm start: {steps} steps, last loss {loss_v:.3f}, letter accuracy on hinted train questions "
            f"{100 * res['train_accuracy']:.0f}% ({res['seconds']:.0f} s)")
    return res
