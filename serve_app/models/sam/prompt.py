"""Prompted masks (points and/or boxes) with an LRU cache of image embeddings.

The encoder is nearly all of a prompted request's cost, and interactive clients send the
same image many times with different prompts, so embeddings are kept per caller-given key
(e.g. the sha256 of the request bytes), bounded by their total size in bytes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

from serve_app.models.sam.encoder import Embedding, check_image, embed, model_device
from serve_app.models.sam.records import MaskRecord, xyxy_to_xywh
from serve_app.models.sam.resample import FullResDecoder, geometry
from serve_app.models.types import stop_if_cancelled


class EmbeddingCache:
    """Least-recently-used embeddings, at most `max_bytes` in total (0 disables it)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, Embedding] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0

    def get(self, key: str) -> Embedding | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: str, item: Embedding) -> None:
        if item.nbytes > self.max_bytes:
            return  # would evict everything and still not fit
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            self._items[key] = item
            self.nbytes += item.nbytes
            while self.nbytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self.nbytes -= evicted.nbytes

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items


Points = Sequence[Sequence[float]] | np.ndarray


class PromptedSegmenter:
    """SamPredictor.predict for one image and many prompts, with cached embeddings.

    Prompt semantics (SAM's): all `points` with their `labels` (1 foreground, 0
    background) form one prompt. Each box is a prompt of its own; when boxes and points
    are both given, every box prompt also carries all the points. One mask per prompt, or
    three (SAM's multimask output, in the model's order) with `multimask`.
    """

    def __init__(
        self,
        model: nn.Module,
        cache_bytes: int = 256 * 2**20,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model = model
        self.dtype = dtype  # the image encoder's (precision.py); embeddings are float32
        self.cache = EmbeddingCache(cache_bytes)
        self.transform = ResizeLongestSide(model.image_encoder.img_size)
        self.encoder_calls = 0
        self._local = threading.local()  # last_hit per calling thread

    @property
    def last_hit(self) -> bool:
        """Whether this thread's last `segment` found its embedding in the cache."""
        return getattr(self._local, "hit", False)

    def embedding(
        self, image_rgb: np.ndarray, key: str | None, cancel: threading.Event | None = None
    ) -> Embedding:
        """The image's embedding from the cache, or from the encoder (then cached)."""
        found = self.cache.get(key) if key is not None else None
        if found is not None and found.orig_hw == tuple(image_rgb.shape[:2]):
            self._local.hit = True
            return found
        self._local.hit = False
        self.encoder_calls += 1
        emb = embed(self.model, image_rgb, dtype=self.dtype, cancel=cancel)
        if key is not None:
            self.cache.put(key, emb)
        return emb

    @torch.inference_mode()
    def segment(
        self,
        image_rgb: np.ndarray,
        key: str | None,
        points: Points | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
        boxes: Points | None = None,
        multimask: bool = False,
        cancel: threading.Event | None = None,
    ) -> list[MaskRecord]:
        """Masks for the prompts; a set `cancel` stops the encoder between blocks and the
        work between masks (`Cancelled`)."""
        check_image(image_rgb)
        pts = None if points is None or len(points) == 0 else np.asarray(points, np.float64)
        bxs = None if boxes is None or len(boxes) == 0 else np.asarray(boxes, np.float64)
        if pts is None and bxs is None:
            raise ValueError("give points and/or boxes")
        if pts is not None:
            lab = np.ones(len(pts), np.int64) if labels is None else np.asarray(labels, np.int64)
            if pts.shape != (len(pts), 2) or lab.shape != (len(pts),):
                raise ValueError("points must be N x 2 with N labels")
        if bxs is not None and bxs.shape != (len(bxs), 4):
            raise ValueError("boxes must be M x 4 (x0, y0, x1, y1)")

        emb = self.embedding(image_rgb, key, cancel)
        hw = emb.orig_hw
        device = model_device(self.model)
        n = 1 if bxs is None else len(bxs)
        point_input = None
        if pts is not None:
            coords = torch.as_tensor(self.transform.apply_coords(pts, hw), device=device)
            point_input = (
                coords.float()[None].expand(n, -1, -1),
                torch.as_tensor(lab, dtype=torch.int, device=device)[None].expand(n, -1),
            )
        box_input = None
        if bxs is not None:
            box_input = torch.as_tensor(
                self.transform.apply_boxes(bxs, hw), dtype=torch.float, device=device
            )
        sparse, dense = self.model.prompt_encoder(points=point_input, boxes=box_input, masks=None)
        low, iou = self.model.mask_decoder(
            image_embeddings=emb.features,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        g = geometry(hw, self.model.image_encoder.img_size, low.shape[-1])
        low = low[..., : g.low_hw[0], : g.low_hw[1]].cpu()
        decoder = FullResDecoder(g)
        records = []
        point_list = [] if pts is None else pts.tolist()
        for p in range(low.shape[0]):
            for m in range(low.shape[1]):
                stop_if_cancelled(cancel, "between masks")
                d = decoder.decode(low[p, m], float(self.model.mask_threshold))
                code, area, box = d.summary()
                records.append(
                    MaskRecord(
                        rle=code,
                        bbox=xyxy_to_xywh(box),
                        area=area,
                        predicted_iou=float(iou[p, m]),
                        stability_score=d.stability,
                        point_coords=point_list,
                        box_prompt=None if bxs is None else bxs[p].tolist(),
                    )
                )
        return records
