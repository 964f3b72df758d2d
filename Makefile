# Two commands on a fresh machine:  `make generate`  and  `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PROMPT ?= a red circle at the top left on a blue background
OUT    ?= out/image.png
# The CPU build of torch where there is no NVIDIA GPU (a bare `torch` would pull a ~3 GB CUDA build).
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch>=2.1$(comma)<2.15,torch==2.13.0)
comma := ,

.PHONY: setup generate test bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[server,train,explain,test]'
	# k-diffusion is a test-only reference; its own requirements would replace torch (via torchvision),
	# and its sampling module needs only these.
	$(PY) -m pip install -q --no-deps k-diffusion==0.1.1.post1
	$(PY) -m pip install -q torchsde torchdiffeq scipy einops jsonmerge
	# spandrel is the ESRGAN-family reference of the upscaler tests; it declares torchvision, which its
	# ESRGAN and Compact code never imports (the tests stand in a stub while importing it)
	$(PY) -m pip install -q --no-deps spandrel==0.4.2
	# the web page tests drive Debian's chromium through Playwright (`playwright install` is never run);
	# the emoji dataset renders Noto Color Emoji
	@{ command -v chromium >/dev/null 2>&1 && [ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ]; } || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium fonts-noto-color-emoji; \
	  elif sudo -n true 2>/dev/null; then sudo apt-get update -qq && sudo apt-get install -y -qq chromium fonts-noto-color-emoji; \
	  else echo "*** chromium or fonts-noto-color-emoji is missing and apt-get needs root: the web UI and emoji tests will fail."; \
	       echo "*** Install them with: sudo apt-get install -y chromium fonts-noto-color-emoji"; fi; }
	touch $@

generate: setup
	$(VENV)/bin/torchsd generate "$(PROMPT)" --output $(OUT)

test: setup
	# style and layers first (seconds): ruff's rules and line length, and the import layers in pyproject.toml
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q

clean:
	rm -rf $(VENV) out .pytest_cache
