# Helpers shared by the launch scripts (sourced, not run): --help, and the shell quoting that
# keeps printed commands readable and pasteable back into a shell.

# Prints the sourcing script's comment header (its lines 2.. up to the first line that is not a
# comment) and exits with status $1 (default 0).
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-0}"; }

# Shell-quotes one word only when it needs it.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# The words, each quoted as needed, joined by spaces.
join_quoted() {
  local out="" word
  for word in "$@"; do out+="${out:+ }$(quote "$word")"; done
  printf '%s' "$out"
}
