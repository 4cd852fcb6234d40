"""Drop 4D-RGPT's TPE, region tokens and P4D into a LlavaForConditionalGeneration.

LLaVA: each image of `pixel_values` is a frame; TPE is added to the vision features entering
`multi_modal_projector` (one timestamp per image); the region grid is the patch grid. Run:

    python examples/llava_dropin.py
"""

from _walkthrough import walkthrough


def main() -> None:
    walkthrough("llava", video=False)


if __name__ == "__main__":
    main()
