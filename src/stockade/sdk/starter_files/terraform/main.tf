# A Stockade template for the terraform backend, written by `stockade templates init`.
# Built-in resources only (terraform_data + local-exec), so it runs wherever the
# Terraform or OpenTofu CLI and bubblewrap (bwrap) are installed: the workspace is
# a sandboxed process on the provisioner's host. Replace the "workspace" resource
# with a container or a VM for real use; keep the contract (see README.md).

terraform {
  required_version = ">= 1.4"
}

# --- what Stockade passes (declare only what you use) -----------------------------
variable "stockade_workspace_dir" {
  description = "A directory on the provisioner host kept for this workspace."
  type        = string
}
variable "stockade_start_count" {
  description = "1 when the workspace starts, 0 when it stops or is deleted."
  type        = number
}
variable "stockade_agent_fingerprint" {
  description = "Changes with every start's new agent token."
  type        = string
}
variable "stockade_agent_init_script" {
  description = "The shell script that starts the agent (holds its token)."
  type        = string
  sensitive   = true
}

# --- template parameters: every other variable is one --------------------------
variable "greeting" {
  description = "Printed by the startup script."
  type        = string
  default     = "hello"
  validation {
    condition     = can(regex("^[a-z ]{1,40}$", var.greeting))
    error_message = "Use 1 to 40 lowercase letters and spaces."
  }
}

# The home directory persists: no count, so only a delete destroys it.
resource "terraform_data" "home" {
  input = "${var.stockade_workspace_dir}/home"

  provisioner "local-exec" {
    command = "mkdir -p \"$HOME_DIR\""
    environment = { HOME_DIR = self.input }
  }
  provisioner "local-exec" {
    when        = destroy
    command     = "rm -rf \"$HOME_DIR\""
    environment = { HOME_DIR = self.input }
  }
}

# The compute: exists while the workspace runs (count), replaced at every start
# (the agent's token changes), its main process the Stockade agent.
resource "terraform_data" "workspace" {
  count            = var.stockade_start_count
  triggers_replace = [var.stockade_agent_fingerprint]
  input = {
    run  = "${var.stockade_workspace_dir}/run"
    home = terraform_data.home.output
  }

  provisioner "local-exec" {
    environment = {
      RUN_DIR  = self.input.run
      HOME_DIR = self.input.home
      INIT     = var.stockade_agent_init_script
    }
    command = <<-EOT
      set -eu
      mkdir -p "$RUN_DIR"
      umask 077
      printf '%s\n' "$INIT" > "$RUN_DIR/init.sh"
      unset INIT
      # The script reaches the sandbox on stdin, and its file goes at once.
      exec 3< "$RUN_DIR/init.sh"
      rm -f "$RUN_DIR/init.sh"
      setsid bwrap --unshare-user --uid 1000 --gid 1000 --cap-drop ALL \
        --unshare-pid --unshare-ipc --unshare-uts --hostname workspace \
        --ro-bind /usr /usr --ro-bind /etc /etc \
        --symlink usr/bin /bin --symlink usr/lib /lib --symlink usr/lib64 /lib64 \
        --symlink usr/sbin /sbin --proc /proc --dev /dev --tmpfs /tmp \
        --bind "$HOME_DIR" /home/workspace --setenv HOME /home/workspace \
        --chdir /home/workspace \
        /bin/sh -s <&3 3<&- >"$RUN_DIR/agent.log" 2>&1 &
      echo $! > "$RUN_DIR/pid"
      echo "workspace started (process group $(cat "$RUN_DIR/pid"))"
    EOT
  }

  provisioner "local-exec" {
    when        = destroy
    environment = { RUN_DIR = self.input.run }
    # SIGTERM first: the agent reports that it shuts down; SIGKILL after 10 s.
    command = <<-EOT
      [ -f "$RUN_DIR/pid" ] || exit 0
      group=$(cat "$RUN_DIR/pid")
      # "-GROUP": the whole process group (no "--": dash's kill refuses it).
      kill -TERM "-$group" 2>/dev/null || true
      for _ in $(seq 1 100); do
        kill -0 "-$group" 2>/dev/null || break
        sleep 0.1
      done
      kill -KILL "-$group" 2>/dev/null || true
      rm -f "$RUN_DIR/pid"
    EOT
  }
}

# Shown on the workspace page.
output "stockade_metadata" {
  value = {
    home    = terraform_data.home.output
    sandbox = "bubblewrap"
  }
}
