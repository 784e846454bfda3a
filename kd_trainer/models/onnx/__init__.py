"""Ship a dual encoder to runtimes without Python or PyTorch: two ONNX graphs, the preprocessing they
expect, and proof on the retrieval metric that the graphs still are the model.

    export = export_onnx(model, "exports/student", int8=True)      # graphs + preprocess.json
    report = verify_onnx_export("exports/student", model, dataset="rstpreid", root="./data")
    encoder = OnnxDualEncoder("exports/student", variant="int8")  # encode_image / encode_text, as evaluation wants

The folder:

* ``image_encoder.onnx`` / ``text_encoder.onnx``: ``pixel_values (batch, 3, H, W) float32`` ->
  ``image_embeds (batch, D)`` and ``input_ids (batch, L) int64`` -> ``text_embeds (batch, D)``, both
  outputs L2-normalised, so a similarity is a dot product. The batch axis is dynamic; H, W and L are fixed.
* ``image_encoder.int8.onnx`` ... (``int8=True``) and ``*.fp16.onnx`` (``fp16=True``): the same graphs,
  weights quantised (by a scheme of :mod:`.quantize`, ``dynamic`` unless ``int8_scheme`` names another) /
  stored in half precision, inputs and outputs unchanged.
* ``preprocess.json``: everything a serving stack needs to make those inputs (squash resize to (H, W),
  bilinear with antialiasing as PIL does it, /255, mean/std; CLIP BPE with the start/end/pad ids and the
  context length), read back here by :class:`OnnxDualEncoder`, which preprocesses only from it; and the
  SHA-256 of every graph, so a truncated, swapped or stale graph is refused, naming the file.
* ``export_report.json``: what :func:`verify_onnx_export` measured, and the checksums of the graphs it
  measured (a report of other graphs is refused).

An export is written beside the folder and moved in when complete, so a failed or killed export never
leaves new and old graphs mixed (:mod:`.folder` says how).

Why the checks. An exported graph can be numerically faithful and still not be the model users trained:
a wrong input size, a wrong tokenizer setting, or quantisation that moves close pairs past each other all
pass a smoke test. So the export is compared twice: the graphs against the PyTorch module on one batch
(max abs difference of the embeddings; fp32 must agree to ``atol``), and, given a dataset, every variant is
evaluated with the project's own ranking code (:func:`kd_trainer.evaluation.rank_metrics`, on images and
captions preprocessed from ``preprocess.json``) against the PyTorch model at its own size
(:func:`kd_trainer.evaluation.evaluate_retrieval`); a drop of R@1 or mAP by more than ``tolerance``
points fails the export.

One module per job: :mod:`.folder` (the layout, ``preprocess.json``, the errors), :mod:`.export`, :mod:`.quantize`,
:mod:`.runtime` (:class:`OnnxDualEncoder`), :mod:`.verify`. The model-card section an export adds is
written by :func:`kd_trainer.models.export.update_model_card`, beside the rest of the model card.
"""

from kd_trainer.models.onnx.export import OnnxExport, at_image_size, export_onnx, preprocess_spec
from kd_trainer.models.onnx.folder import (
    IMAGE_ENCODER,
    PREPROCESS_FILE,
    REPORT_FILE,
    TEXT_ENCODER,
    VARIANTS,
    DeployDependencyError,
    OnnxExportError,
    OnnxFolderError,
    check_output_folder,
    read_report,
)
from kd_trainer.models.onnx.runtime import OnnxDualEncoder
from kd_trainer.models.onnx.verify import (
    ExportVerificationError,
    check_limits,
    compare_embeddings,
    evaluate_onnx,
    format_export_report,
    verify_onnx_export,
)

__all__ = [
    "IMAGE_ENCODER",
    "TEXT_ENCODER",
    "PREPROCESS_FILE",
    "REPORT_FILE",
    "VARIANTS",
    "DeployDependencyError",
    "OnnxExportError",
    "OnnxFolderError",
    "ExportVerificationError",
    "OnnxExport",
    "OnnxDualEncoder",
    "at_image_size",
    "check_limits",
    "check_output_folder",
    "read_report",
    "preprocess_spec",
    "export_onnx",
    "compare_embeddings",
    "evaluate_onnx",
    "verify_onnx_export",
    "format_export_report",
]
