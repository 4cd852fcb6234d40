"""Drop 4D-RGPT's TPE, region tokens and P4D into a LlavaNextVideoForConditionalGeneration.

Videos: the `vision_resampler` pools each frame's patch grid (2x2 here) before
`multi_modal_projector`; TPE is added to the pooled features and the region boxes are scaled to
the pooled grid. Run:

    python examples/llava_next_video_dropin.py
"""

from _walkthrough import walkthrough


def main() -> None:
    walkthrough("llava_next_video", video=True)


if __name__ == "__main__":
    main()
