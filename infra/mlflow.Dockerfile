# MLflow tracking server with its basic-auth app (the `auth` extra), the Postgres driver and the S3 client
# its backend and artifact store need; mlflow_server.sh starts it with auth configured from the environment.
FROM python:3.11-slim
ARG MLFLOW_VERSION
RUN pip install --no-cache-dir "mlflow[auth]==${MLFLOW_VERSION}" psycopg2-binary boto3
COPY --chmod=0755 mlflow_server.sh /usr/local/bin/mlflow_server.sh
EXPOSE 5000
