# Source this on the GPU machine (from the repo root): it lays qconv out as its wheel would
# (converter/ -> qconv/, formats/ -> qconv/formats/, registry/ -> qconv/registry/) without a build
# step, and puts it with the packages that machine lacks (.dev/site, from ../shared/gpu/pack.sh)
# on PYTHONPATH.
rm -rf /tmp/qc && mkdir -p /tmp/qc
cp -r converter /tmp/qc/qconv && cp -r formats /tmp/qc/qconv/formats && cp -r registry /tmp/qc/qconv/registry
export PYTHONPATH=/tmp/qc:$PWD/.dev/site
export PYTHONUNBUFFERED=1 QCONV_HOME=/tmp/qconv-home HF_HUB_OFFLINE=1
