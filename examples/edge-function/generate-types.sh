#!/usr/bin/env bash
# Generates the function's API types from a served Bento's OpenAPI schema with openapi-typescript (pinned in
# package.json: `npm ci` here first).
#
#   generate-types.sh [--check] [BENTO_URL]
#
# BENTO_URL defaults to http://127.0.0.1:3000 (`make serve`); SAM3_API_KEY is sent as X-API-Key when set.
# --check writes nothing and fails when the committed file differs from what the schema generates.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
check=()
if [ "${1:-}" = --check ]; then check=(--check); shift; fi
url=${1:-http://127.0.0.1:3000}
out=$here/supabase/functions/segment/sam3-api.d.ts

schema=$(mktemp --suffix=.json)
trap 'rm -f "$schema"' EXIT
curl -sSf -H "X-API-Key: ${SAM3_API_KEY:-}" "$url/api/v1/openapi.json" -o "$schema"
"$here/node_modules/.bin/openapi-typescript" "$schema" --default-non-nullable false --output "$out" "${check[@]}"
