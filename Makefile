# The project's pipeline as readable steps. Every recipe is a plain script call you can run alone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: setup test reproduce sweep-temperature filter bench clean-reproduce

# ---- environment -----------------------------------------------------------------------------
# The virtual environment, rebuilt when the requirements change.
setup: $(VENV)/.installed
$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

test: setup
	$(PY) -m pytest -q tests

# ---- the paper's experiment at small scale ---------------------------------------------------
# make reproduce [SEEDS=3] [PRESET=configs/reproduce]. A step whose output exists and whose inputs
# (data, preset, code) did not change is skipped on rerun, as make does for any file target.
PRESET  ?= configs/reproduce
OUT     ?= out/reproduce
DATA    ?= data/shakespeare_mem
SEEDS   ?= 1
START   := $(shell date +%s)
comma   := ,
SEED_LIST := $(shell seq 1 $(SEEDS))
BASELINES := $(foreach s,$(SEED_LIST),$(OUT)/baseline_seed$(s)/model.safetensors)
MODELS := teacher:$(OUT)/teacher,$(subst $() ,$(comma),$(foreach s,$(SEED_LIST),baseline_seed$(s):$(OUT)/baseline_seed$(s))),student_soft:$(OUT)/student_soft,student_hard:$(OUT)/student_hard

# 0. D: fixed-length examples of the default corpus.
$(DATA)/meta.json: prepare.py tokenizer.py $(PRESET)/prepare.toml | setup
	$(PY) prepare.py --config $(PRESET)/prepare.toml --name=$(notdir $(DATA)) --out_dir=$(dir $(DATA))

# 1. The teacher, cross-entropy on D.
$(OUT)/teacher/model.safetensors: $(DATA)/meta.json $(PRESET)/teacher.toml train.py model.py
	$(PY) train.py --config $(PRESET)/teacher.toml --data=$(DATA) --out_dir=$(OUT)/teacher --overwrite

# 2. The baseline(s): the student's size, cross-entropy on D, one run per seed.
$(OUT)/baseline_seed%/model.safetensors: $(DATA)/meta.json $(PRESET)/baseline.toml train.py model.py
	$(PY) train.py --config $(PRESET)/baseline.toml --data=$(DATA) --out_dir=$(OUT)/baseline_seed$* --seed=$* --overwrite

# 3. The soft student: forward KL to the teacher at T = 2, from the start of baseline seed 1.
$(OUT)/student_soft/model.safetensors: $(OUT)/teacher/model.safetensors $(PRESET)/student.toml distill.py train.py
	$(PY) distill.py --config $(PRESET)/student.toml --kind=soft --teacher=$(OUT)/teacher --data=$(DATA) --out_dir=$(OUT)/student_soft --seed=1 --overwrite

# 4. The hard student: cross-entropy on the teacher's greedy continuations of D's prefixes.
$(OUT)/student_hard/model.safetensors: $(OUT)/teacher/model.safetensors $(PRESET)/student.toml distill.py train.py
	$(PY) distill.py --config $(PRESET)/student.toml --kind=hard --teacher=$(OUT)/teacher --data=$(DATA) --out_dir=$(OUT)/student_hard --seed=1 --overwrite

# 5. Who memorized what, why, the classifier, the extraction attack, and the report.
$(OUT)/summary.json: $(OUT)/teacher/model.safetensors $(BASELINES) $(OUT)/student_soft/model.safetensors $(OUT)/student_hard/model.safetensors $(PRESET)/memorize.toml memorize.py
	$(PY) memorize.py --config $(PRESET)/memorize.toml --data=$(DATA) --models=$(MODELS) --out=$(OUT) --started_at=$(START)

reproduce: $(OUT)/summary.json
	@cat $(OUT)/headline.txt

clean-reproduce:
	rm -rf $(OUT) $(DATA)

bench: setup
	$(PY) bench.py
