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
# The first baseline is "baseline" (seed 1, the students' start); more seeds are baseline_seed2, ...
BASELINE_NAMES := baseline $(foreach s,$(wordlist 2,$(SEEDS),$(shell seq 1 $(SEEDS))),baseline_seed$(s))
BASELINES := $(foreach b,$(BASELINE_NAMES),$(OUT)/$(b)/model.safetensors)
FAMILY := teacher $(BASELINE_NAMES) student_soft student_hard
MODELS := $(subst $() ,$(comma),$(foreach m,$(FAMILY),$(m):$(OUT)/$(m)))
TRAIN_CODE := train.py model.py config.py prepare.py
# For the GPU presets: LAUNCH="torchrun --standalone --nproc_per_node=8", the corpus (INPUT=shards or
# folder), a tokenizer file (TOKENIZER=...), and pretrained starts (TEACHER_INIT=..., STUDENT_INIT=...).
LAUNCH  ?= $(PY)
INPUT   ?=
TOKENIZER ?=
TEACHER_INIT ?=
STUDENT_INIT ?=
prepare_args := $(if $(INPUT),--input="$(INPUT)") $(if $(TOKENIZER),--tokenizer=$(TOKENIZER))
teacher_args := $(if $(TEACHER_INIT),--init_from=$(TEACHER_INIT))
student_args := $(if $(STUDENT_INIT),--init_from=$(STUDENT_INIT))

# 0. D: fixed-length examples of the default corpus.
$(DATA)/meta.json: prepare.py tokenizer.py $(PRESET)/prepare.toml | setup
	$(PY) prepare.py --config $(PRESET)/prepare.toml --name=$(notdir $(DATA)) --out_dir=$(dir $(DATA)) $(prepare_args)

# 1. The teacher, cross-entropy on D.
$(OUT)/teacher/model.safetensors: $(DATA)/meta.json $(PRESET)/teacher.toml $(TRAIN_CODE)
	$(LAUNCH) train.py --config $(PRESET)/teacher.toml --data=$(DATA) --out_dir=$(OUT)/teacher --overwrite $(teacher_args)

# 2. The baseline(s): the student's size, cross-entropy on D; seed 1, then one run per extra seed.
$(OUT)/baseline/model.safetensors: $(DATA)/meta.json $(PRESET)/baseline.toml $(TRAIN_CODE)
	$(LAUNCH) train.py --config $(PRESET)/baseline.toml --data=$(DATA) --out_dir=$(OUT)/baseline --seed=1 --overwrite $(student_args)
$(OUT)/baseline_seed%/model.safetensors: $(DATA)/meta.json $(PRESET)/baseline.toml $(TRAIN_CODE)
	$(LAUNCH) train.py --config $(PRESET)/baseline.toml --data=$(DATA) --out_dir=$(OUT)/baseline_seed$* --seed=$* --overwrite $(student_args)

# 3. The soft student: forward KL to the teacher at T = 2, with the baseline's seed, start and budget.
$(OUT)/student_soft/model.safetensors: $(OUT)/teacher/model.safetensors $(PRESET)/student.toml distill.py $(TRAIN_CODE)
	$(LAUNCH) distill.py --config $(PRESET)/student.toml --kind=soft --teacher=$(OUT)/teacher --data=$(DATA) --out_dir=$(OUT)/student_soft --seed=1 --overwrite $(student_args)

# 4. The hard student: cross-entropy on the teacher's greedy continuations of D's prefixes.
$(OUT)/student_hard/model.safetensors: $(OUT)/teacher/model.safetensors $(PRESET)/student.toml distill.py $(TRAIN_CODE)
	$(LAUNCH) distill.py --config $(PRESET)/student.toml --kind=hard --teacher=$(OUT)/teacher --data=$(DATA) --out_dir=$(OUT)/student_hard --seed=1 --overwrite $(student_args)

# 5. Who memorized what and why, the classifier, the extraction attack.
$(OUT)/memorization/summary.json: $(OUT)/teacher/model.safetensors $(BASELINES) $(OUT)/student_soft/model.safetensors $(OUT)/student_hard/model.safetensors $(PRESET)/memorize.toml memorize.py classifier.py
	$(LAUNCH) memorize.py --config $(PRESET)/memorize.toml --data=$(DATA) --models=$(MODELS) --out=$(OUT)/memorization

# 6. The report: this run next to the paper.
reproduce: $(OUT)/memorization/summary.json
	$(PY) report.py --out=$(OUT) --started_at=$(START)

# The soft student at T = 1, 2, 3, 4 (T = 2 is the one above), measured and added to the report.
TEMPERATURES := 1 3 4
sweep-temperature: $(OUT)/memorization/summary.json $(foreach t,$(TEMPERATURES),$(OUT)/sweep/student_T$(t)/model.safetensors)
	$(PY) memorize.py --config $(PRESET)/memorize.toml --data=$(DATA) --out=$(OUT)/sweep --filter=false --extract_samples=0 \
	  --models=student_T2:$(OUT)/student_soft,$(subst $() ,$(comma),$(foreach t,$(TEMPERATURES),student_T$(t):$(OUT)/sweep/student_T$(t)))
	$(PY) report.py --out=$(OUT)
$(OUT)/sweep/student_T%/model.safetensors: $(OUT)/teacher/model.safetensors $(PRESET)/student.toml distill.py $(TRAIN_CODE)
	$(LAUNCH) distill.py --config $(PRESET)/student.toml --kind=soft --temperature=$* --teacher=$(OUT)/teacher --data=$(DATA) --out_dir=$(OUT)/sweep/student_T$* --seed=1 --overwrite $(student_args)

# Distill again on D without the examples the classifier flagged, and count what is memorized.
filter: $(OUT)/memorization/summary.json
	@test -f $(OUT)/memorization/filtered_data/meta.json || { echo "make filter: there is no filtered dataset, as the classifier did not run; filter.status in $(OUT)/memorization/summary.json says why"; exit 2; }
	$(LAUNCH) distill.py --config $(PRESET)/student.toml --kind=soft --teacher=$(OUT)/teacher --data=$(OUT)/memorization/filtered_data --out_dir=$(OUT)/student_filtered --seed=1 --overwrite $(student_args)
	$(PY) memorize.py --config $(PRESET)/memorize.toml --data=$(OUT)/memorization/filtered_data --out=$(OUT)/filter --filter=false --extract_samples=0 \
	  --models=student_filtered:$(OUT)/student_filtered
	$(PY) report.py --out=$(OUT)

clean-reproduce:
	rm -rf $(OUT) $(DATA)

bench: setup
	$(PY) bench.py
