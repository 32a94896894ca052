# Two commands from a fresh clone: `make run` and `make test`. Each sets up what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
FMNIST := /usr/share/datasets/fashion-mnist
SUDO   := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: setup data tools lint run test bundled-model bundled-card sample-catalog clean help

help:
	@echo "make run    tag sample_catalog/ with the bundled model into tags.parquet"
	@echo "make test   run the whole test suite (installs everything, incl. Fashion-MNIST)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,ray]'
	touch $(STAMP)

setup: $(STAMP)

# Fashion-MNIST from the Debian/Ubuntu package (no internet needed beyond the package mirror).
data:
	@if [ -n "$$CATALOG_TAGGER_DATA" ] || [ -f $(FMNIST)/t10k-images-idx3-ubyte.gz ] || [ -f $(FMNIST)/t10k-images-idx3-ubyte ]; then \
	  echo "Fashion-MNIST: found"; \
	else \
	  echo "Fashion-MNIST: installing the Debian package dataset-fashion-mnist"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	fi

run: setup
	$(BIN)/catalog-tagger tag sample_catalog --out tags.parquet

# Real programs for the tests of what users open: a browser for the review page, a
# spreadsheet program for the review workbook (Debian packages; nothing else downloads).
tools:
	@if command -v chromium >/dev/null && command -v soffice >/dev/null; then \
	  echo "chromium, LibreOffice Calc: found"; \
	else \
	  echo "installing the Debian packages chromium and libreoffice-calc"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends chromium libreoffice-calc; \
	fi

# Lint and type-check first: seconds, and they name the line.
lint: setup
	$(BIN)/ruff check catalog_tagger tests benchmarks
	$(BIN)/mypy catalog_tagger

test: setup data tools lint
	$(BIN)/python -m pytest -q

# For development: everything but the tests marked slow (training or evaluating on full data).
quick: setup data tools lint
	$(BIN)/python -m pytest -q -m "not slow"

# Re-train the model shipped inside the package (its card records this command).
bundled-model: setup data
	$(BIN)/catalog-tagger train --out runs/fashion-garment-cnn --epochs 72 --seed 0 --no-mixed-precision
	cp runs/fashion-garment-cnn/model.safetensors runs/fashion-garment-cnn/model.json catalog_tagger/models/

# Re-fit the bundled card's calibration and out-of-scope detector (weights unchanged):
# deterministic, from the Fashion-MNIST validation split and 20,000 training images.
bundled-card: setup data
	$(BIN)/catalog-tagger calibrate --model catalog_tagger/models

sample-catalog: setup data
	$(BIN)/python sample_catalog/generate.py

clean:
	rm -rf $(VENV) runs tags.parquet tags.summary.json .pytest_cache
