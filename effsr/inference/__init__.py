"""Large-image inference: tiling, routing and writing SR images."""

from effsr.inference.tiling import (
    RoutedOutput,
    route_batch_size,
    route_overlay,
    routed_forward,
    tile_grid,
    tiled_forward,
)

__all__ = ["RoutedOutput", "route_batch_size", "route_overlay", "routed_forward", "tile_grid", "tiled_forward"]
