"""Drop 4D-RGPT's TPE, region tokens and P4D into a LlavaOnevisionForConditionalGeneration.

Videos (`pixel_values_videos` [B, F, 3, H, W]): one timestamp per frame; TPE on the features
entering `multi_modal_projector` (OneVision pools the grid after the projector, so regions read
the full patch grid). Images: one timestamp per image, every crop of an any-resolution image gets
it; several images per sample (`batch_num_images`) are one crop each. Run:

    python examples/llava_onevision_dropin.py
"""

from _walkthrough import walkthrough


def main() -> None:
    walkthrough("llava_onevision", video=True)
    walkthrough("llava_onevision", video=False)


if __name__ == "__main__":
    main()
