"""Drop 4D-RGPT's TPE, region tokens and P4D into a Qwen2VLForConditionalGeneration.

The projector is the vision tower's `merger`; its input is one vector per patch. Images: one
timestamp per image. Videos: one per frame; the tower merges `temporal_patch_size` (2) frames
into each token, which gets the mean of their timestamps. Regions read the merged grid (each 2x2
patch window's vectors concatenated), so boxes are scaled by 1 / (patch size x merge size).
Run:

    python examples/qwen2_vl_dropin.py
"""

from _walkthrough import walkthrough


def main() -> None:
    walkthrough("qwen2_vl", video=True)
    walkthrough("qwen2_vl", video=False)


if __name__ == "__main__":
    main()
