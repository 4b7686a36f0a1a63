#!/bin/sh
# `mlflow server` with MLflow's built-in basic auth (`--app-name basic-auth`), configured only from the
# environment. Used by the `mlflow` service of docker-compose.yml and by tests/test_team_stack.py.
#
#   MLFLOW_BACKEND_STORE_URI        runs and registry, e.g. postgresql+psycopg2://USER:PASSWORD@HOST:5432/mlflow
#   MLFLOW_AUTH_DATABASE_URI        users and permissions (default: the backend store; MLflow's auth tables
#                                   and their migration history do not clash with the tracking tables)
#   MLFLOW_AUTH_ADMIN_USERNAME      admin account, created on the first start against an empty user store
#   MLFLOW_AUTH_ADMIN_PASSWORD      (both ignored once the admin exists; rotate it with the update-password API)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  static key for the auth app's CSRF protection (same on every replica)
#   MLFLOW_AUTH_DEFAULT_PERMISSION  what a signed-in user may do where nothing grants more (default READ)
#   MLFLOW_AUTH_CACHE_TTL_SECONDS   seconds a verified password stays trusted by a server worker (default 0,
#                                   MLflow's: every request checks the PBKDF2 hash, ~1-2 s of CPU on a small
#                                   machine; a password change then reaches the other workers within this time)
#
# Every other argument goes to `mlflow server` (--host, --port, --artifacts-destination, ...).
# Clients sign in with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD.
set -eu

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI (the runs and registry database)}"
: "${MLFLOW_AUTH_ADMIN_USERNAME:?set MLFLOW_AUTH_ADMIN_USERNAME}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY}"

# The auth app reads its database from an ini file only; the file holds a password, so only we may read it.
old_umask="$(umask)"
umask 077
conf_dir="$(mktemp -d)"
export MLFLOW_AUTH_CONFIG_PATH="$conf_dir/basic_auth.ini"
# configparser interpolates '%': double it, so a URL-encoded password survives.
auth_db="$(printf '%s' "${MLFLOW_AUTH_DATABASE_URI:-$MLFLOW_BACKEND_STORE_URI}" | sed 's/%/%%/g')"
printf '[mlflow]\ndefault_permission = %s\ndatabase_uri = %s\nauth_cache_ttl_seconds = %s\n' \
  "${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}" "$auth_db" "${MLFLOW_AUTH_CACHE_TTL_SECONDS:-0}" >"$MLFLOW_AUTH_CONFIG_PATH"
umask "$old_umask"

exec mlflow server --app-name basic-auth --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" "$@"
