"""What automatic mask generation will do, counted before any of it runs (pure Python).

One encoder run per crop and one decoder prompt per point of each crop's grid, exactly as
segment_anything builds them: `generate_crop_boxes` makes (2**layer)**2 crops in crop layer
`layer` (the whole image is layer 0), and `build_all_layer_point_grids` gives every crop of
that layer a grid of int(points_per_side / downscale**layer) points a side. The image size
does not change either count (the encoder always sees a 1024-pixel side). Kept light (no
torch) so that the config check can use it too.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PlannedWork:
    encoder_runs: int
    decoder_prompts: int


def crop_layers(points_per_side: int, crop_n_layers: int, downscale: int) -> list[tuple[int, int]]:
    """(crops, points per crop) of each crop layer, the whole image first."""
    return [
        (4**layer, int(points_per_side / downscale**layer) ** 2)
        for layer in range(crop_n_layers + 1)
    ]


def planned_work(points_per_side: int, crop_n_layers: int, downscale: int = 1) -> PlannedWork:
    layers = crop_layers(points_per_side, crop_n_layers, downscale)
    return PlannedWork(
        encoder_runs=sum(crops for crops, _ in layers),
        decoder_prompts=sum(crops * points for crops, points in layers),
    )
