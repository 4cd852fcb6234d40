"""A collated data batch -> the student's inputs: where the data meets the model's tokenizer and config."""

from __future__ import annotations

from rgpt4d.data.schema import LETTERS
from rgpt4d.models.configs import RGPT4DConfig
from rgpt4d.models.tokenizer import answer_ids, encode_batch, encode_conversations


def batch_to_inputs(batch: dict, tokenizer, config: RGPT4DConfig, answers: bool = True) -> dict:
    """Student inputs from a collated `Synth4DQuestions` / `R4DBench` batch (rgpt4d.data.collate):
    the prompt tokens (with the answer in `config.answer_format` and labels when `answers`; a batch of
    `QuestionsByVideo` chunks becomes one multi-turn sequence per video), frames, timestamps,
    first-frame boxes with their mask and <obj_N> numbers, and the SoM image when the model uses it."""
    def target(index, options):
        return answer_ids(tokenizer, config.answer_format, LETTERS[int(index)], options[int(index)], options)[0]

    if "turn_prompts" in batch and answers:  # rgpt4d.data.QuestionsByVideo: a video's questions in one sequence
        targets = [[target(i, o) for i, o in zip(idx, opts)]
                   for idx, opts in zip(batch["turn_answers"], batch["turn_options"])]
        inputs = encode_conversations(tokenizer, batch["turn_prompts"], config.prompt_visual(), targets,
                                      restate=config.restate_mode())
    else:
        targets = [target(i, o) for i, o in zip(batch["answer_index"], batch["options"])] if answers else None
        inputs = encode_batch(tokenizer, batch["prompt"], config.prompt_visual(), targets,
                              restate=config.restate_mode())
    inputs.update(frames=batch["frames"], timestamps=batch["timestamps"], boxes=batch.get("boxes"),
                  region_mask=batch.get("region_mask"), region_ids=batch.get("region_ids"))
    if config.region_mode in ("som", "both"):
        inputs["som_image"] = batch["som_image"]
    return inputs
