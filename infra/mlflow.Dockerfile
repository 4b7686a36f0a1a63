# MLflow tracking server with the Postgres driver and the S3 client its backend and artifact store need.
FROM python:3.11-slim
ARG MLFLOW_VERSION
RUN pip install --no-cache-dir "mlflow==${MLFLOW_VERSION}" psycopg2-binary boto3
EXPOSE 5000
