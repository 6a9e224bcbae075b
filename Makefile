# Two commands on a fresh machine: `make demo` (install + run the default experiment)
# and `make test` (install + run the test suite). Both create .venv when it is missing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test figures clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m bench

test: $(STAMP)
	$(BIN)/python -m pytest -q

# README images: a real run (small_cnn on 32 shapes, 6 methods, pixel flipping MoRF + LeRF, MPRT,
# pointing game) into outputs/readme/ (ignored; outside results/, so its 32-sample run never mixes
# into the default leaderboard), whose report includes the gallery, and four of its
# PNGs, reduced to 256 colours, copied to results/figures/ (committed). About 2 CPU-minutes once
# small_cnn is cached (first use trains it, about 1 more minute).
FIGURE_RUN := outputs/readme
figures: $(STAMP)
	rm -rf $(FIGURE_RUN)
	$(BIN)/python -m bench experiment=quick results_dir=$(FIGURE_RUN) \
	    'method=[saliency,integrated_gradients,guided_backprop,grad_cam,random,edge]' \
	    'metric=[pixel_flipping,mprt,pointing_game]' metric.pixel_flipping.order=both \
	    'metric.mprt.measures=[spearman]'
	mkdir -p results/figures
	$(BIN)/python -c "import sys; from PIL import Image; [Image.open(f'$(FIGURE_RUN)/report/{a}.png').convert('RGB') \
	    .quantize(256, dither=Image.Dither.NONE).save(f'results/figures/{b}.png', optimize=True) \
	    for a, b in zip(sys.argv[1::2], sys.argv[2::2])]" \
	    scores_shapes_small_cnn leaderboard curves_pixel_flipping_morf_lerf pixel_flipping \
	    mprt_grid_shapes_small_cnn_mprt_0 mprt_grid gallery_shapes_small_cnn gallery

clean:
	rm -rf $(filter-out results/figures/,$(wildcard results/*/)) outputs multirun .pytest_cache
