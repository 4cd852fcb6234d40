"""Drop 4D-RGPT's TPE, region tokens and P4D into a Qwen3VLForConditionalGeneration.

The projector is the vision tower's `merger`; its input is one vector per patch. Images: one
timestamp per image. Videos: one per frame; the tower merges `temporal_patch_size` (2) frames
into each token, which gets the mean of their timestamps. Regions read the merged grid (each 2x2
patch window's vectors concatenated), so boxes are scaled by 1 / (patch size x merge size).
The deepstack mergers read intermediate tower features and are left as they are: TPE rides on the
main merger's input.
Run:

    python examples/qwen3_vl_dropin.py
"""

from _walkthrough import walkthrough


def main() -> None:
    walkthrough("qwen3_vl", video=True)
    walkthrough("qwen3_vl", video=False)


if __name__ == "__main__":
    main()
