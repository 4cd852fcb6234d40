"""Tiny models for the model tests: 4 frames of 32x32, a 2-layer SigLIP and Qwen2 (seconds to build)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.conftest import MODEL_STACK_MISSING, ModelStackSkipped  # noqa: E402

T, S = 4, 32

# The modules that run without rgpt4d's own model stack (transformers' model classes and the ops
# only); the others skip with the reason when it cannot run (an older transformers, or none).
WITHOUT_MODEL_STACK = {"test_integration.py", "test_regional_encoder.py"}


def pytest_pycollect_makemodule(module_path, parent):
    if MODEL_STACK_MISSING is not None and module_path.name not in WITHOUT_MODEL_STACK:
        return ModelStackSkipped.from_parent(parent, path=module_path)
    return None


@pytest.fixture(scope="session")
def tokenizer():
    from rgpt4d.models.tokenizer import train_tokenizer

    return train_tokenizer(vocab_size=600)


def make_student(tokenizer, **overrides):
    from rgpt4d.models.configs import student_config
    from rgpt4d.models.student import RGPT4DForConditionalGeneration

    kw = dict(num_frames=T, projector_hidden_size=64, region_hidden_size=32,
              vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 image_size=S, patch_size=8, vision_use_head=False),
              text_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=128, max_position_embeddings=512, tie_word_embeddings=False))
    kw.update(overrides)
    torch.manual_seed(0)
    return RGPT4DForConditionalGeneration(student_config("tiny", tokenizer, **kw))


def teacher_config():
    from rgpt4d.models.configs import TeacherConfig

    return TeacherConfig(image_size=S, patch_size=8, num_frames=T, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64, head_layers=(1, 1, 2, 2), head_features=16)


@pytest.fixture(scope="session")
def student(tokenizer):
    return make_student(tokenizer)


def make_batch(tokenizer, config, answers=("A", "C"), prompts=None, B=2):
    from rgpt4d.models.tokenizer import encode_batch

    g = torch.Generator().manual_seed(1)
    prompts = prompts or ["How tall is <obj_1>?\n(A) 1 m\n(B) 2 m", "Is <obj_2> left of <obj_1>?\n(A) yes\n(B) no"][:B]
    enc = encode_batch(tokenizer, prompts, config.num_visual_tokens, list(answers)[:B] if answers else None,
                       restate=config.restate_mode())  # the prompts as the model reads them
    frames = torch.randint(0, 256, (B, T, 3, 48, 48), dtype=torch.uint8, generator=g)
    ts = torch.cumsum(torch.rand(B, T, generator=g) + 0.05, 1)
    boxes = torch.tensor([[[2.0, 3.0, 20.0, 30.0], [30.0, 30.0, 47.0, 47.0]],
                          [[5.0, 5.0, 12.0, 40.0], [10.0, 1.0, 44.0, 22.0]]])[:B]
    return dict(enc, frames=frames, timestamps=ts, boxes=boxes, region_mask=torch.ones(B, 2, dtype=torch.bool))


def train_step(model, inputs, **extra):
    """One forward with labels and backward of its loss: (loss, logits or None, {name: gradient})."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs, **extra)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), (None if out.logits is None else out.logits.detach()), grads
