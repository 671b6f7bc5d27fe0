#!/usr/bin/env bash
# Spark 4 needs Java 17 or newer. Say exactly what to do when it is missing.
set -u
if [ -n "${JAVA_HOME:-}" ] && [ -x "$JAVA_HOME/bin/java" ]; then java_bin="$JAVA_HOME/bin/java"; else java_bin=$(command -v java || true); fi
if [ -z "$java_bin" ]; then
  cat >&2 <<'MSG'
ERROR: Java was not found, and Spark 4 needs Java 17 or newer.
  Debian/Ubuntu:  sudo apt-get update && sudo apt-get install -y openjdk-17-jre-headless
  macOS:          brew install openjdk@17 && export JAVA_HOME=$(/usr/libexec/java_home -v 17)
  Or point JAVA_HOME at an existing JDK 17+ installation.
MSG
  exit 1
fi
version=$("$java_bin" -version 2>&1 | awk -F'"' '/version/ {print $2; exit}')
major=${version%%.*}
[ "$major" = "1" ] && major=$(echo "$version" | cut -d. -f2)
if ! [ "$major" -ge 17 ] 2>/dev/null; then
  echo "ERROR: $java_bin is Java $version; Spark 4 needs Java 17 or newer." >&2
  echo "  Install openjdk-17-jre-headless (apt) or set JAVA_HOME to a JDK 17+." >&2
  exit 1
fi
echo "Java $version found ($java_bin)"
