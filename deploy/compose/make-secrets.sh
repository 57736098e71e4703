#!/bin/sh
# Writes fresh random secrets for deploy/compose into ./secrets (or the directory given), one
# env file per service so that each container sees only its own:
#   nats.env      every NATS user's password (the servers resolve $NATS_*_PASSWORD in accounts.conf)
#   worker.env    the worker's NATS password, the Redis password (also inside REDIS_URL), the
#                 pseudonymization key
#   deployer.env  the deployer's NATS password
#   redis.env     the Redis password
#   grafana.env   Grafana's admin password
# Refuses to overwrite: rotating a secret is a deliberate act (the pseudonymization key above all:
# a new key gives every user a new pseudonym, so bump its version, k1 → k2).
set -eu

dir="${1:-$(dirname "$0")/secrets}"
if [ -e "$dir/nats.env" ] || [ -e "$dir/worker.env" ]; then
  echo "make-secrets: $dir already holds secrets; move them away first to make new ones" >&2
  exit 1
fi

# 32 random bytes as hex, behind a letter: nats-server parses a `$VAR` value as a config value,
# so one that starts with a digit becomes a number ("12GB") or fails to parse ("9e3f…").
rand() { printf 's%s' "$(head -c 32 /dev/urandom | od -An -v -tx1 | tr -d ' \n')"; }

umask 077
mkdir -p "$dir"

producer=$(rand); worker=$(rand); deployer=$(rand); ml_reader=$(rand); oncall=$(rand); sys=$(rand)
redis=$(rand); grafana=$(rand); pseudonym=$(rand)

cat > "$dir/nats.env" <<END
NATS_PRODUCER_PASSWORD=$producer
NATS_WORKER_PASSWORD=$worker
NATS_DEPLOYER_PASSWORD=$deployer
NATS_ML_READER_PASSWORD=$ml_reader
NATS_ONCALL_PASSWORD=$oncall
NATS_SYS_PASSWORD=$sys
END

# REDIS_URL carries the password as well: the worker's Redis client is opened from the URL
# (src/state/redis.ts openRedis), so the URL must authenticate on its own.
cat > "$dir/worker.env" <<END
NATS_PASSWORD=$worker
REDIS_PASSWORD=$redis
REDIS_URL=redis://:$redis@redis:6379
TACIT_PSEUDONYM_KEY=k1:$pseudonym
END

cat > "$dir/deployer.env" <<END
NATS_PASSWORD=$deployer
END

cat > "$dir/redis.env" <<END
REDIS_PASSWORD=$redis
END

cat > "$dir/grafana.env" <<END
GF_SECURITY_ADMIN_PASSWORD=$grafana
END

echo "make-secrets: wrote nats.env worker.env deployer.env redis.env grafana.env in $dir"
echo "make-secrets: give producers, ML readers and on-call their NATS passwords from nats.env"
