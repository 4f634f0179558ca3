# The two commands of the README's quick start. Both install everything first (quickly when
# already installed), so each works on a fresh machine by itself.
PYTHON ?= python3
PROMPT ?= an astronaut riding a horse on the moon, detailed, 8k
MODEL ?= stable-diffusion-v1-5/stable-diffusion-v1-5
OUT ?= outputs

.PHONY: install image test

install:
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt

image: install
	$(PYTHON) -m gesso generate "$(PROMPT)" --model "$(MODEL)" --out "$(OUT)"

test: install
	$(PYTHON) -m pytest -q
