# Shell quoting shared by the launch scripts (sourced, not run): printed commands stay
# readable and can be pasted back into a shell.

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
