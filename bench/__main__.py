"""`python -m bench`: the Hydra app that runs an experiment (conf/config.yaml) and reports it."""
from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bench.run import run


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg, out_dir=HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
