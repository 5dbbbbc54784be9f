"""Export to ONNX: uint8 pixels in, hash values and packed codes out, all in one graph.

Graph interface (what Triton and every client rely on):

* input ``IMAGE``: uint8 [B, S, S, 3], RGB, already warped to S x S (``dlheir.preprocess``);
* output ``PROBS``: float32 [B, N], the hash layer's values;
* output ``CODE``: uint8 [B, ceil(N/8)], ``PROBS >= 0.5`` packed MSB-first and zero padded,
  exactly ``dlheir.codes.probs_to_codes``.

B is dynamic; S and N are static, so consumers read them from the graph's shapes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dlheir.codes import THRESHOLD
from dlheir.contract import CODE as OUTPUT_CODE
from dlheir.contract import IMAGE as INPUT_NAME
from dlheir.contract import PROBS as OUTPUT_PROBS
from dlheir.contract import code_bytes, onnx_signature  # noqa: F401  (onnx_signature: re-exported)
from dlheir.export.model import DLHEIR, to_input


class ExportWrapper(nn.Module):
    """NHWC uint8 -> the model's pixel input, run the model (which normalises), threshold and pack the bits."""

    def __init__(self, model: DLHEIR) -> None:
        super().__init__()
        self.model = model.eval()
        bits = model.bits
        self.pad = code_bytes(bits) * 8 - bits
        self.register_buffer("weights", torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.int32))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs, _ = self.model(to_input(image))
        bits = (probs >= THRESHOLD).to(torch.int32)
        if self.pad:
            bits = nn.functional.pad(bits, (0, self.pad))
        packed = (bits.view(bits.shape[0], -1, 8) * self.weights).sum(dim=2)
        return probs, packed.to(torch.uint8)


def export_onnx(model: DLHEIR, out_path: Path | str, image_size: int, opset: int = 17) -> Path:
    """Write the ONNX graph to ``out_path`` (atomically) and check it with ``onnx.checker``."""
    import onnx

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = ExportWrapper(model).eval()
    dummy = torch.zeros(2, image_size, image_size, 3, dtype=torch.uint8)
    tmp = out_path.with_name(out_path.name + ".tmp")
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (dummy,),
            str(tmp),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_PROBS, OUTPUT_CODE],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_PROBS: {0: "batch"}, OUTPUT_CODE: {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    onnx.checker.check_model(str(tmp))
    tmp.replace(out_path)
    return out_path
