#!/bin/sh
# MLproject's docker_env forwards each variable as "$NAME", so one that the host lacks arrives empty:
# treat empty as unset (an empty MLFLOW_S3_ENDPOINT_URL, say, would be taken as an endpoint), then run the command.
for name in $(env | sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)=$/\1/p'); do
    unset "$name"
done
exec "$@"
