# Shared by scripts/test.sh and scripts/demo.sh: create or update .venv.
# ensure_venv [EXTRA]: installs the package (editable) with the given extra.
ensure_venv() {
  local extra="${1:-}"
  local py="${PYTHON:-python3}"
  [ -x .venv/bin/python ] || "$py" -m venv .venv
  local stamp=".venv/.glm-jax-installed${extra:+-$extra}"
  if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    if [[ ",$extra," == *,test,* ]]; then
      .venv/bin/python -m pip install -q "torch==2.13.0"
    fi
    .venv/bin/python -m pip install -q -e ".${extra:+[$extra]}"
    touch "$stamp"
  fi
}
