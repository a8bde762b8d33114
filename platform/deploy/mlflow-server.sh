#!/usr/bin/env bash
# The MLflow tracking server of an ioulab cluster, with authentication (MLflow's basic-auth app).
#
#   platform/deploy/mlflow-server.sh STATE_DIR ARTIFACTS [HOST [PORT [MLFLOW SERVER OPTIONS...]]]
#
# STATE_DIR  a folder on this machine's local disk, never NFS (SQLite locking is unreliable there):
#            the run store mlflow.db and the user store basic_auth.db. Only this server writes them.
# ARTIFACTS  where run artifacts go: shared storage every node reaches, or s3://bucket/prefix.
# HOST PORT  the address to listen on (default 127.0.0.1 5000); further options go to `mlflow server`
#            (e.g. --workers 2).
#
# Environment:
#   MLFLOW_AUTH_ADMIN_USERNAME, MLFLOW_AUTH_ADMIN_PASSWORD (12+ characters)  required: the admin user,
#       created on the first start (later starts keep the stored password). Clients log in with
#       MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
#   MLFLOW_FLASK_SERVER_SECRET_KEY  optional: the key of the web UI's CSRF protection (default: one
#       generated on the first start and kept in STATE_DIR/flask_secret_key).
#   MLFLOW_BACKEND_STORE_URI  optional: a PostgreSQL URI instead of STATE_DIR/mlflow.db.
#   MLFLOW_ALLOWED_HOSTS      optional: the Host headers accepted (default HOST:PORT), e.g.
#       "mlflow.internal:5000,10.0.0.5:5000"; others are refused (DNS-rebinding protection).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 STATE_DIR ARTIFACTS [HOST [PORT [MLFLOW SERVER OPTIONS...]]]" >&2
  exit 2
fi
: "${MLFLOW_AUTH_ADMIN_USERNAME:?set MLFLOW_AUTH_ADMIN_USERNAME (the MLflow admin user)}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD (12+ characters)}"
mkdir -p "$1"
state=$(cd "$1" && pwd)
artifacts=$2
host=${3:-127.0.0.1}
port=${4:-5000}

# MLflow's auth config: the user store beside the run store (the packaged default is a relative
# sqlite:///basic_auth.db, i.e. wherever the server happens to start).
cat > "$state/basic_auth.ini" <<INI
[mlflow]
default_permission = READ
database_uri = sqlite:///$state/basic_auth.db
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH=$state/basic_auth.ini
if [[ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]]; then
  [[ -s "$state/flask_secret_key" ]] || (umask 077 && python -c "import secrets; print(secrets.token_hex(32))" > "$state/flask_secret_key")
  MLFLOW_FLASK_SERVER_SECRET_KEY=$(cat "$state/flask_secret_key")
  export MLFLOW_FLASK_SERVER_SECRET_KEY
fi

exec mlflow server --app-name basic-auth --host "$host" --port "$port" \
  --backend-store-uri "${MLFLOW_BACKEND_STORE_URI:-sqlite:///$state/mlflow.db}" \
  --artifacts-destination "$artifacts" \
  --allowed-hosts "${MLFLOW_ALLOWED_HOSTS:-$host:$port}" "${@:5}"
