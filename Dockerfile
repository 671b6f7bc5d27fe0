# Project image for the scaled-out deployment: Airflow services, the MLflow server, the Spark
# master/worker (pyspark's bundled Spark, so driver and cluster versions always match) and
# torchrun training all run this one image. .dockerignore keeps .env, data/, .airflow/ and
# .venv/ out of `COPY . .`; secrets reach the containers only through the environment.
# /opt/airflow (AIRFLOW_HOME) is writable by group 0, the group compose runs Airflow with.
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless procps curl git \
 && rm -rf /var/lib/apt/lists/*
ENV JAVA_HOME=/usr/lib/jvm/java-17-openjdk-amd64 \
    PYTHONUNBUFFERED=1 \
    PYSPARK_PYTHON=/usr/local/bin/python \
    PYSPARK_DRIVER_PYTHON=/usr/local/bin/python

WORKDIR /opt/mmn
COPY requirements.lock pyproject.toml README.md ./
RUN pip install --no-cache-dir -r requirements.lock psycopg2-binary==2.9.10
COPY . .
RUN pip install --no-cache-dir --no-deps -e . \
 && ln -s "$(python -c 'import pyspark, os; print(os.path.dirname(pyspark.__file__))')" /opt/spark \
 && mkdir -p /opt/airflow && chgrp 0 /opt/airflow && chmod 0770 /opt/airflow
ENV SPARK_HOME=/opt/spark PATH=/opt/spark/bin:$PATH
