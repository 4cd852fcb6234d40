"""Drop 4D-RGPT's TPE, region tokens and P4D into an InternVLForConditionalGeneration.

Each entry of `pixel_values` is a frame (one tile per frame); the projector is
`multi_modal_projector`, after InternVL's pixel shuffle, so TPE is added to the shuffled features
(4x the vision width) and regions read the shuffled grid (half the patch grid per side). Run:

    python examples/internvl_dropin.py
"""

from _walkthrough import walkthrough


def main() -> None:
    walkthrough("internvl", video=False)


if __name__ == "__main__":
    main()
