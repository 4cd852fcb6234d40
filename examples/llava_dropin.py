"""Drop 4D-RGPT's TPE and region tokens into your own transformers MLLM.

Builds a tiny LlavaForConditionalGeneration (SigLIP + Qwen2) from configs (no download), patches it
with `apply_rgpt4d`, then runs forward and generate on a 4-frame "video" with its timestamps in
seconds (one per image) and one region box referenced by an <obj_1> token. Run:

    python examples/llava_dropin.py
"""

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

from rgpt4d.integrations.transformers import apply_rgpt4d, attach_p4d, detach_p4d, p4d_latent_loss, remove_rgpt4d

IMAGE_TOKEN, OBJ_1 = 99, 60  # ids in your tokenizer: the image placeholder and your "<obj_1>" token
FRAMES, IMG, PATCH = 4, 32, 8
TOKENS_PER_IMAGE = (IMG // PATCH) ** 2


def main() -> None:
    torch.manual_seed(0)
    vision = SiglipVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                image_size=IMG, patch_size=PATCH, vision_use_head=False)
    text = Qwen2Config(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128)
    config = LlavaConfig(vision_config=vision.to_dict() | {"model_type": "siglip_vision_model"},
                         text_config=text.to_dict() | {"model_type": "qwen2"}, image_token_index=IMAGE_TOKEN,
                         vision_feature_select_strategy="full", vision_feature_layer=-1,
                         image_seq_length=TOKENS_PER_IMAGE)
    model = LlavaForConditionalGeneration(config).eval()

    # the video: FRAMES images, each a frame, with its time in seconds (a variable frame rate is fine)
    pixel_values = torch.randn(FRAMES, 3, IMG, IMG)
    timestamps = torch.tensor([[0.0, 0.4, 1.1, 2.5]])
    input_ids = torch.cat([torch.tensor([[1]]), torch.full((1, FRAMES * TOKENS_PER_IMAGE), IMAGE_TOKEN),
                           torch.tensor([[7, OBJ_1, 8, 9]])], 1)
    boxes = torch.tensor([[[2.0, 3.0, 20.0, 25.0]]])  # <obj_1> in the first frame, pixels

    with torch.no_grad():
        before = model(input_ids=input_ids, pixel_values=pixel_values).logits
    apply_rgpt4d(model, obj_token_ids=[OBJ_1])
    with torch.no_grad():
        unchanged = model(input_ids=input_ids, pixel_values=pixel_values).logits
        with_time = model(input_ids=input_ids, pixel_values=pixel_values, timestamps=timestamps, boxes=boxes).logits
    print(f"without timestamps the patched model is unchanged: {torch.equal(before, unchanged)}")
    print(f"with timestamps and a region: max logit change {float((with_time - before).abs().max()):.4f}")
    out = model.generate(input_ids=input_ids, pixel_values=pixel_values, timestamps=timestamps, boxes=boxes,
                         max_new_tokens=5, do_sample=False)
    print("generated:", out[0, input_ids.shape[1]:].tolist())

    # training-only P4D head: distil a (here random) teacher latent of 2 x 4 x 4 tokens x 16
    attach_p4d(model, teacher_dim=16, teacher_grid=(2, 4, 4), tubelet=2)
    out = model(input_ids=input_ids, pixel_values=pixel_values, timestamps=timestamps, output_hidden_states=True)
    loss = p4d_latent_loss(model, out.hidden_states[-1], input_ids, FRAMES, torch.randn(1, 2, 4, 4, 16))
    loss.backward()
    print(f"P4D latent loss {float(loss.detach()):.4f}; D_4DP removed before saving:", end=" ")
    detach_p4d(model)
    remove_rgpt4d(model)
    print(not any("rgpt4d" in n for n, _ in model.named_parameters()))


if __name__ == "__main__":
    main()
