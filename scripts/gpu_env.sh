# Sourced by the GPU scripts from the repository root: installs the wheels carried in .whl/ (grain,
# ml_collections, ...) into /tmp/site once, and puts it and the repository on PYTHONPATH. Scripts started
# side by side share the install: the first holds a lock while it installs, the others wait and reuse it.
if compgen -G ".whl/*.whl" >/dev/null; then
  wheels=$(sha1sum .whl/*.whl | sha1sum | cut -c1-12)
  (
    flock 9
    [ -f "/tmp/site/.installed-$wheels" ] && exit 0
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl && touch "/tmp/site/.installed-$wheels"
  ) 9>/tmp/site.lock || { echo "error: installing the carried wheels in .whl/ failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
