"""Drop 4D-RGPT's TPE, region tokens and P4D into a Qwen2_5_VLForConditionalGeneration.

The projector is the vision tower's `merger`; its input is one vector per patch. Images: one
timestamp per image. Videos: one per frame; the tower merges `temporal_patch_size` (2) frames
into each token, which gets the mean of their timestamps. Regions read the merged grid (each 2x2
patch window's vectors concatenated), so boxes are scaled by 1 / (patch size x merge size).
The vision tower reorders patches into attention windows before the merger; the region grid is
put back in raster order.
Run:

    python examples/qwen2_5_vl_dropin.py
"""

from _walkthrough import walkthrough


def main() -> None:
    walkthrough("qwen2_5_vl", video=True)
    walkthrough("qwen2_5_vl", video=False)


if __name__ == "__main__":
    main()
