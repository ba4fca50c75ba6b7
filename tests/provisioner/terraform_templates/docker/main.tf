# A workspace container made with the docker CLI from local-exec (no provider:
# these machines have none in a mirror). The home volume persists; the
# container exists while the workspace runs and is replaced at every start.

variable "stockade_workspace_id" { type = string }
variable "stockade_deployment_id" { type = string }
variable "stockade_start_count" { type = number }
variable "stockade_agent_fingerprint" { type = string }
variable "stockade_agent_init_script" {
  type      = string
  sensitive = true
}

variable "motto" {
  description = "What the startup script says."
  type        = string
  default     = "hello"
}
variable "image" {
  description = "The workspace image (never pulled)."
  type        = string
  default     = "stockade-base:bookworm"
}

locals {
  labels = "--label stockade.deployment=${var.stockade_deployment_id} --label stockade.workspace_id=${var.stockade_workspace_id}"
}

resource "terraform_data" "home" {
  input = "stockade-tf-home-${var.stockade_workspace_id}"
  provisioner "local-exec" {
    command = "docker volume create ${local.labels} ${self.input}"
  }
  provisioner "local-exec" {
    when    = destroy
    command = "docker volume rm -f ${self.input}"
  }
}

resource "terraform_data" "container" {
  count            = var.stockade_start_count
  triggers_replace = [var.stockade_agent_fingerprint]
  input = {
    name = "stockade-tf-${var.stockade_workspace_id}"
  }

  provisioner "local-exec" {
    environment = {
      NAME = self.input.name
      INIT = var.stockade_agent_init_script
    }
    # The init script holds the agent token: copied in as a file, never in
    # the container's configuration (docker inspect shows that to anyone).
    command = <<-EOT
      set -eu
      docker rm -f "$NAME" >/dev/null 2>&1 || true
      docker create --name "$NAME" ${local.labels} --network host \
        -v ${terraform_data.home.output}:/home/stockade --user stockade \
        --entrypoint /bin/sh ${var.image} -c 'exec /bin/sh /tmp/stockade-init.sh' >/dev/null
      dir=$(mktemp -d)
      printf '%s\n' "$INIT" > "$dir/stockade-init.sh"
      chmod 0644 "$dir/stockade-init.sh"
      docker cp "$dir/stockade-init.sh" "$NAME:/tmp/stockade-init.sh"
      rm -rf "$dir"
      docker start "$NAME"
    EOT
  }

  provisioner "local-exec" {
    when    = destroy
    command = "docker stop -t 10 ${self.input.name} >/dev/null 2>&1; docker rm -f ${self.input.name}"
  }
}

output "stockade_metadata" {
  value = {
    volume = terraform_data.home.output
    image  = var.image
  }
}

output "stockade_apps" {
  value = [
    { slug = "files", display_name = "Files", port = 8000, share = "owner", subdomain = false },
  ]
}
