# The two commands (see README): `make run` and `make test`. Both build their own venv.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_FLAGS ?= -q

.PHONY: setup run test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) --upgrade pip
	$(PY) -m pip install $(PIP_FLAGS) -c constraints.txt -e ".[dev]"
	touch $@

run: setup
	$(PY) train.py --config configs/tiny.yaml --workdir runs/tiny
	$(PY) decode.py --config configs/tiny.yaml --checkpoint runs/tiny --prompt "ROMEO:" --gen-len 120
	$(PY) decode.py --config configs/tiny.yaml --checkpoint runs/tiny --batch 32 --prompt-len 128 --gen-len 256

test: setup
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15 tests

clean:
	rm -rf $(VENV)
