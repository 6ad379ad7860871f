"""`llmlab decompose`: low-rank factorization of a model's linear layers (svd, asvd, svd_llm), saved packed."""

import dataclasses
import time

from llmlab.compress.calibrate import calibration_data
from llmlab.compress.lowrank import LOWRANK_METHODS, LowRankConfig, decompose
from llmlab.compress.quantize import folder_bytes, state_bytes
from llmlab.config import field
from llmlab.errors import LlmlabError
from llmlab.models.load import ModelOptions
from llmlab.models.packed.io import save_decomposed
from llmlab.models.surgery import count_parameters
from llmlab.runs import start_run


@dataclasses.dataclass
class DecomposeConfig(ModelOptions):
    method: str = field("svd", help=", ".join(LOWRANK_METHODS))
    rank: int | None = field(None, help="rank of every decomposed layer")
    param_ratio: float | None = field(None, help="fraction of each layer's parameters kept, in (0, 1)")
    energy: float | None = field(None, help="keep the smallest rank with this fraction of Σσ², in (0, 1]")
    alpha: float = field(0.5, help="asvd: exponent of the activation scale")
    skip: list[str] = field([], help="regexes of full module names to leave whole")
    calib: str | None = field(None, help="calibration text file (asvd, svd_llm)")
    n_samples: int = field(32, help="calibration windows")
    seq_len: int = field(512, help="tokens per calibration window")
    seed: int = field(0, help="seed that picks the calibration windows")

    def __post_init__(self):
        cfg = self.lowrank_config()
        if cfg.needs_calib and not self.calib:
            raise LlmlabError(f"--method {self.method} reads activations: give --calib FILE (not the evaluation text)")

    def lowrank_config(self) -> LowRankConfig:
        return LowRankConfig(method=self.method, rank=self.rank, param_ratio=self.param_ratio, energy=self.energy,
                             alpha=self.alpha, skip=list(self.skip))


def decompose_verb(cfg: DecomposeConfig, opts) -> dict:
    lr_cfg = cfg.lowrank_config()
    model, tokenizer = cfg.load_model()
    calib = calibration_data(tokenizer, cfg.calib, cfg.n_samples, cfg.seq_len, cfg.seed) if lr_cfg.needs_calib else None
    before, bytes_before = count_parameters(model), state_bytes(model)
    with start_run("decompose", cfg, opts) as run:
        start = time.perf_counter()
        decompose(model, calib, lr_cfg)
        seconds = time.perf_counter() - start
        saved = save_decomposed(model, tokenizer, run.artifact("model"))
        ranks = list(model.llmlab_lowrank["modules"].values())
        result = {"model": cfg.model, "method": cfg.method, "layers": len(ranks),
                  "mean_rank": round(sum(ranks) / max(len(ranks), 1), 1), "params_before": before,
                  "params_after": count_parameters(model), "bytes_before": bytes_before,
                  "size_on_disk_bytes": folder_bytes(saved), "seconds": round(seconds, 2), "saved": str(saved)}
        run.log_metrics(**result)
        summary = run.finish(result)
    print(f"decomposed {cfg.model} with {cfg.method}: {len(ranks)} layers (mean rank {result['mean_rank']}), "
          f"{before / 1e6:.1f}M -> {result['params_after'] / 1e6:.1f}M parameters in {seconds:.1f} s -> {saved}")
    return summary
