# The project's pipeline as readable steps. Every recipe is a plain script call you can run alone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: FORCE setup test notebooks gpu-check reproduce robustness study sweep-temperature filter bench clean-reproduce

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

# ---- the walkthroughs as executed notebooks, in notebooks/ (ignored by git: outputs are never committed)
notebooks: $(VENV)/.notebooks
	mkdir -p notebooks
	for f in walkthroughs/0*.py; do \
	  $(VENV)/bin/jupytext --to ipynb --set-kernel python3 --execute --run-path walkthroughs \
	    -o notebooks/$$(basename $$f .py).ipynb $$f || exit 1; \
	done
$(VENV)/.notebooks: requirements-notebooks.txt $(VENV)/.installed
	$(PY) -m pip install -q -r requirements-notebooks.txt
	touch $@

# ---- the paper's experiment at small scale ---------------------------------------------------
# make reproduce [FAMILY_SEED=k] [SEEDS=3] [PRESET=configs/reproduce]. A step whose output exists and
# whose inputs (data, preset, code, family seed) did not change is skipped on rerun, as make does for
# any file target.
PRESET  ?= configs/reproduce
OUT     ?= out/reproduce
DATA    ?= data/shakespeare_mem
BASE_DATA ?= data/shakespeare_base
BASES   ?= out/bases
SEEDS   ?= 3
FAMILY_SEED ?= 1
START   := $(shell date +%s)
comma   := ,
# Seeds of the family's fine-tuning runs: the teacher k0, baseline j kj, the students k1 (baseline
# 1's seed: the same data order as the baseline they are compared with). Family 2: 20, 21-23, 21.
TEACHER_SEED := $(FAMILY_SEED)0
STUDENT_SEED := $(FAMILY_SEED)1
# The first baseline is "baseline" (the students' data order), more seeds are baseline_seed2, ...
BASELINE_NAMES := baseline $(foreach s,$(wordlist 2,$(SEEDS),$(shell seq 1 $(SEEDS))),baseline_seed$(s))
BASELINES := $(foreach b,$(BASELINE_NAMES),$(OUT)/$(b)/model.safetensors)
# The code each step runs (tests/test_imports.py checks it against what the step calls), so that a
# change to it makes the step run again.
TRAIN_CODE    := train.py model.py checkpoint.py distributed.py data.py config.py memorize.py quantize.py
DISTILL_CODE  := distill.py tokenizer.py $(TRAIN_CODE)
MEASURE_CODE  := memorize.py classifier.py report.py tokenizer.py model.py checkpoint.py distributed.py data.py \
                 config.py quantize.py
EXTRACT_CODE  := extract.py $(MEASURE_CODE)
PREPARE_CODE  := prepare.py tokenizer.py data.py config.py
# For the GPU presets: LAUNCH="torchrun --standalone --nproc_per_node=8", the corpus (INPUT=shards or
# folder), a tokenizer file (TOKENIZER=...), and pretrained starts (TEACHER_INIT=..., STUDENT_INIT=...),
# which replace the bases this pipeline would otherwise pretrain.
# Steps that do not depend on each other run side by side, JOBS at a time, each with its share of
# the cores (on 2 cores: two steps of one thread each, which trains more tokens per second in all
# than one step on two threads). make JOBS=1 runs one step at a time on every core.
JOBS    ?= 2
THREADS ?= $(shell n=$$(( $$(nproc) / $(JOBS) )); echo $$(( n > 0 ? n : 1 )))
ifeq ($(MAKELEVEL),0)
MAKEFLAGS += -j$(JOBS)
endif
# memorize.py, the last step, runs alone: it splits the examples over JOBS processes (torchrun, one
# per lane), unless LAUNCH was given (then it runs as every other step does).
ifeq ($(origin LAUNCH),undefined)
MEMORIZE_LAUNCH ?= $(if $(filter 1,$(JOBS)),OMP_NUM_THREADS=$(THREADS) $(PY),OMP_NUM_THREADS=$(THREADS) $(VENV)/bin/torchrun --standalone --nproc_per_node=$(JOBS))
endif
LAUNCH  ?= OMP_NUM_THREADS=$(THREADS) $(PY)
MEMORIZE_LAUNCH ?= $(LAUNCH)
INPUT   ?=
TOKENIZER ?=
TEACHER_INIT ?=
STUDENT_INIT ?=
prepare_args := $(if $(INPUT),--input="$(INPUT)") $(if $(TOKENIZER),--tokenizer=$(TOKENIZER))
TEACHER_START := $(or $(TEACHER_INIT),$(BASES)/teacher)
STUDENT_START := $(or $(STUDENT_INIT),$(BASES)/student)
TEACHER_BASE := $(if $(TEACHER_INIT),,$(BASES)/teacher/model.safetensors)
STUDENT_BASE := $(if $(STUDENT_INIT),,$(BASES)/student/model.safetensors)
FAMILY := base_teacher base_student teacher $(BASELINE_NAMES) student_soft student_hard
MODELS := base_teacher:$(TEACHER_START),base_student:$(STUDENT_START),$(subst $() ,$(comma),$(foreach m,$(wordlist 3,99,$(FAMILY)),$(m):$(OUT)/$(m)))
# The family seed of the models in OUT: rewritten (and so retraining the family) only when FAMILY_SEED
# differs from the last run's. Made only by the steps that need it, never by make's parsing.
SEED_STAMP := $(OUT)/.family_seed
$(SEED_STAMP): FORCE
	@mkdir -p $(@D); echo $(FAMILY_SEED) | cmp -s - $@ || echo $(FAMILY_SEED) > $@
FORCE:

# 0. D, the fine-tuning data: fixed-length examples of part of the corpus's documents, and the
#    bases' pretraining text: the other documents (prepare_base.toml overrides prepare.toml's layout).
$(DATA)/meta.json: $(PREPARE_CODE) $(PRESET)/prepare.toml | setup
	$(PY) prepare.py --config $(PRESET)/prepare.toml --name=$(notdir $(DATA)) --out_dir=$(dir $(DATA)) $(prepare_args)
$(BASE_DATA)/meta.json: $(DATA)/meta.json $(PREPARE_CODE) $(PRESET)/prepare_base.toml
	$(PY) prepare.py --config $(PRESET)/prepare.toml --config $(PRESET)/prepare_base.toml --tokenizer=$(DATA)/tokenizer.model \
	  --name=$(notdir $(BASE_DATA)) --out_dir=$(dir $(BASE_DATA)) $(if $(INPUT),--input="$(INPUT)")

# 1. The bases: a teacher-size and a student-size model pretrained on text that holds no example of D.
#    Shared by every family seed.
$(BASES)/%/model.safetensors: $(BASE_DATA)/meta.json $(PRESET)/base_%.toml $(TRAIN_CODE)
	$(LAUNCH) train.py --config $(PRESET)/base_$*.toml --data=$(BASE_DATA) --out_dir=$(BASES)/$* --overwrite

# 2. The teacher: its base fine-tuned on D with cross-entropy.
$(OUT)/teacher/model.safetensors: $(DATA)/meta.json $(TEACHER_BASE) $(PRESET)/teacher.toml $(TRAIN_CODE) $(SEED_STAMP)
	$(LAUNCH) train.py --config $(PRESET)/teacher.toml --data=$(DATA) --out_dir=$(OUT)/teacher --init_from=$(TEACHER_START) \
	  --seed=$(TEACHER_SEED) --overwrite

# 3. The baselines: the student base fine-tuned on D with cross-entropy, one run per data-order seed.
$(OUT)/baseline/model.safetensors: $(DATA)/meta.json $(STUDENT_BASE) $(PRESET)/baseline.toml $(TRAIN_CODE) $(SEED_STAMP)
	$(LAUNCH) train.py --config $(PRESET)/baseline.toml --data=$(DATA) --out_dir=$(OUT)/baseline --init_from=$(STUDENT_START) \
	  --seed=$(STUDENT_SEED) --overwrite
$(OUT)/baseline_seed%/model.safetensors: $(DATA)/meta.json $(STUDENT_BASE) $(PRESET)/baseline.toml $(TRAIN_CODE) $(SEED_STAMP)
	$(LAUNCH) train.py --config $(PRESET)/baseline.toml --data=$(DATA) --out_dir=$(OUT)/baseline_seed$* --init_from=$(STUDENT_START) \
	  --seed=$(FAMILY_SEED)$* --overwrite

# 4. The soft student: the student base distilled from the teacher on D (forward KL at T = 2), with
#    the first baseline's start, data order and budget.
$(OUT)/student_soft/model.safetensors: $(OUT)/teacher/model.safetensors $(PRESET)/student.toml $(DISTILL_CODE)
	$(LAUNCH) distill.py --config $(PRESET)/student.toml --kind=soft --teacher=$(OUT)/teacher --data=$(DATA) \
	  --out_dir=$(OUT)/student_soft --init_from=$(STUDENT_START) --seed=$(STUDENT_SEED) --overwrite

# 5. The hard student: cross-entropy on the teacher's greedy continuations of D's prefixes.
$(OUT)/student_hard/model.safetensors: $(OUT)/teacher/model.safetensors $(PRESET)/student.toml $(DISTILL_CODE)
	$(LAUNCH) distill.py --config $(PRESET)/student.toml --kind=hard --teacher=$(OUT)/teacher --data=$(DATA) \
	  --out_dir=$(OUT)/student_hard --init_from=$(STUDENT_START) --seed=$(STUDENT_SEED) --overwrite

# 6. Who memorized what and why (the bases too, as controls), the classifier and the filter.
FAMILY_MODELS := $(OUT)/teacher/model.safetensors $(BASELINES) $(OUT)/student_soft/model.safetensors $(OUT)/student_hard/model.safetensors
$(OUT)/memorization/summary.json: $(FAMILY_MODELS) $(PRESET)/memorize.toml $(MEASURE_CODE)
	$(MEMORIZE_LAUNCH) memorize.py --config $(PRESET)/memorize.toml --data=$(DATA) --models=$(MODELS) --out=$(OUT)/memorization

# 7. The extraction attack on the teacher, a baseline as the reference (after memorize.py: one step at a time
#    on every lane).
$(OUT)/extraction/summary.json: $(OUT)/memorization/summary.json $(PRESET)/extract.toml $(EXTRACT_CODE)
	$(MEMORIZE_LAUNCH) extract.py --config $(PRESET)/extract.toml --data=$(DATA) --models=$(MODELS) --out=$(OUT)/extraction

# 8. The report: this run next to the paper.
reproduce: $(OUT)/memorization/summary.json $(OUT)/extraction/summary.json
	$(PY) report.py --out=$(OUT) --started_at=$(START)

# The whole reproduction for family seeds 1, 2 and 3, each in its own folder, and the findings
# across them ("holds in k of 3"). The temperature sweep and the filtering run on the first seed.
ROBUSTNESS ?= out/robustness
FAMILY_SEEDS ?= 1 2 3
robustness:
	+$(foreach k,$(FAMILY_SEEDS),$(MAKE) --no-print-directory $(if $(filter $(k),$(firstword $(FAMILY_SEEDS))),study,reproduce) \
	  FAMILY_SEED=$(k) OUT=$(ROBUSTNESS)/seed$(k) && ) true
	$(PY) report.py --families=$(subst $() ,$(comma),$(foreach k,$(FAMILY_SEEDS),$(ROBUSTNESS)/seed$(k))) --out=$(ROBUSTNESS)

# reproduce, sweep-temperature and filter in one go, with one report at the end (three reports
# written side by side would race for the same files).
study: $(OUT)/memorization/summary.json $(OUT)/extraction/summary.json $(OUT)/sweep/summary.json $(OUT)/filter/summary.json
	$(PY) report.py --out=$(OUT) --started_at=$(START)

# The soft student at T = 1, 2, 3, 4 (T = 2 is the one above), measured and added to the report.
TEMPERATURES := 1 3 4
sweep-temperature: $(OUT)/sweep/summary.json
	$(PY) report.py --out=$(OUT)
$(OUT)/sweep/summary.json: $(OUT)/memorization/summary.json $(foreach t,$(TEMPERATURES),$(OUT)/sweep/student_T$(t)/model.safetensors)
	$(LAUNCH) memorize.py --config $(PRESET)/memorize.toml --data=$(DATA) --out=$(OUT)/sweep --filter=false \
	  --models=student_T2:$(OUT)/student_soft,$(subst $() ,$(comma),$(foreach t,$(TEMPERATURES),student_T$(t):$(OUT)/sweep/student_T$(t)))
$(OUT)/sweep/student_T%/model.safetensors: $(OUT)/teacher/model.safetensors $(PRESET)/student.toml $(DISTILL_CODE)
	$(LAUNCH) distill.py --config $(PRESET)/student.toml --kind=soft --temperature=$* --teacher=$(OUT)/teacher --data=$(DATA) \
	  --out_dir=$(OUT)/sweep/student_T$* --init_from=$(STUDENT_START) --seed=$(STUDENT_SEED) --overwrite

# Distill again on D without the examples the classifier flagged, and count what is memorized. When
# the classifier could not run (too few memorized examples), there is nothing to filter: the summary
# says so and the report marks the finding as one this run cannot judge.
filter: $(OUT)/filter/summary.json
	$(PY) report.py --out=$(OUT)
$(OUT)/filter/summary.json: $(OUT)/memorization/summary.json
	@if [ ! -f $(OUT)/memorization/filtered_data/meta.json ]; then \
	  echo "make filter: no filtered dataset, as the classifier did not run; filter.status in $(OUT)/memorization/summary.json says why"; \
	  mkdir -p $(OUT)/filter && echo '{"skipped": "the classifier did not run, so nothing was filtered"}' > $@; \
	else \
	  set -x; \
	  $(LAUNCH) distill.py --config $(PRESET)/student.toml --kind=soft --teacher=$(OUT)/teacher --data=$(OUT)/memorization/filtered_data \
	    --out_dir=$(OUT)/student_filtered --init_from=$(STUDENT_START) --seed=$(STUDENT_SEED) --overwrite && \
	  $(LAUNCH) memorize.py --config $(PRESET)/memorize.toml --data=$(OUT)/memorization/filtered_data --out=$(OUT)/filter \
	    --filter=false --models=student_filtered:$(OUT)/student_filtered; \
	fi

clean-reproduce:
	rm -rf $(OUT) $(DATA)

bench: setup
	$(PY) bench.py

# On a CUDA machine: every GPU path checked and measured in one run (gpu_check.py; out/gpu_check/results.md).
gpu-check: setup
	$(PY) gpu_check.py
