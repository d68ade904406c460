#!/usr/bin/env bash
# Make sure the services the tests and the demo use are installed and running on
# loopback: RabbitMQ (5672, guest/guest) and PostgreSQL (5432, database "test").
# Installs Debian's packages when absent (needs root), starts what is stopped, and
# waits until each answers. Usage: scripts/services.sh [rabbitmq] [postgres] [chromium]
# (chromium: Debian's browser and its WebDriver, for the web console's browser test.)
set -euo pipefail
want=("$@"); [ ${#want[@]} -eq 0 ] && want=(rabbitmq postgres chromium)

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
  for _ in $(seq 1 120); do port_open "$1" && return 0; sleep 0.5; done
  echo "error: nothing answers on 127.0.0.1:$1 after 60 s ($2)" >&2; return 1
}
apt_install() {
  if [ "$(id -u)" != 0 ]; then echo "error: $* missing; install it (needs root): apt-get install $*" >&2; exit 2; fi
  if [ -z "${APT_UPDATED:-}" ]; then apt-get update -qq; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

for service in "${want[@]}"; do
  case "$service" in
  rabbitmq)
    if ! port_open 5672; then
      command -v rabbitmq-server >/dev/null 2>&1 || apt_install rabbitmq-server
      if ! port_open 5672; then
        echo "starting RabbitMQ" >&2
        rabbitmq-server -detached >/dev/null 2>&1 || true
      fi
      wait_port 5672 RabbitMQ
    fi
    command -v rabbitmqctl >/dev/null 2>&1 && rabbitmqctl -q await_startup >/dev/null 2>&1 || true
    ;;
  postgres)
    if ! port_open 5432; then
      command -v pg_ctlcluster >/dev/null 2>&1 || apt_install postgresql
      version=$(ls /etc/postgresql | sort -V | tail -1)
      echo "starting PostgreSQL $version" >&2
      pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
      wait_port 5432 PostgreSQL
    fi
    export PGPASSWORD="${PGPASSWORD:-postgres}"
    if ! psql -h 127.0.0.1 -U postgres -d test -tAc 'select 1' >/dev/null 2>&1; then
      # A fresh cluster: give the postgres role the test password and create "test".
      if [ "$(id -u)" = 0 ] && id postgres >/dev/null 2>&1; then
        su postgres -c "psql -q -c \"ALTER ROLE postgres PASSWORD 'postgres'\"" >/dev/null
        su postgres -c "psql -tAc \"SELECT 1 FROM pg_database WHERE datname='test'\"" | grep -q 1 ||
          su postgres -c "createdb test"
      fi
      psql -h 127.0.0.1 -U postgres -d test -tAc 'select 1' >/dev/null ||
        { echo "error: cannot log in to PostgreSQL as postgres on 127.0.0.1:5432, database test" >&2; exit 2; }
    fi
    ;;
  chromium)
    if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
      apt_install chromium chromium-driver
    fi
    ;;
  *) echo "unknown service $service" >&2; exit 2 ;;
  esac
done
