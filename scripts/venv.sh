# Sourced by serve.sh and test.sh: create .venv once (or use $VIRTUAL_ENV), then activate it.
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
